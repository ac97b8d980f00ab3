"""Named constants shared by the model, the tokenizer and the input pipeline.

The token ids are fixed so that a batch is meaningful without its tokenizer: the SentencePiece
model is trained with exactly these ids (see `tokenizer.py`).
"""

PAD_ID = 0  # Padding; masks are derived from it. Also the segment id of padding in packed rows.
EOS_ID = 1  # End of sequence: appended to every source and target.
BOS_ID = 2  # Start symbol: the first decoder input ("targets shifted right", section 3.1).
UNK_ID = 3  # Unknown piece.

# A finite large negative used to mask attention logits (section 3.2.3: "setting to -inf").
# Finite so that a row with every key masked yields a uniform softmax rather than NaN.
MASK_VALUE = -1e9
NEG_INF = float("-inf")  # The log-probability of an impossible or empty hypothesis (decoding).

SPLITS = ("train", "validation", "test")  # A corpus's splits, by these names in every source.
