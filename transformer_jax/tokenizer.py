"""SentencePiece tokenizer: one vocabulary shared by source and target (section 5.1).

The paper uses byte-pair encoding with a shared source-target vocabulary of about 37,000 tokens
for English-German; BPE is the default here and the unigram model an option. The special ids are
fixed (`constants.py`): PAD_ID 0, EOS_ID 1, BOS_ID 2, UNK_ID 3, so batches mean the same thing
with any trained vocabulary. The model file is saved with the run and reused when it exists.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from transformer_jax.constants import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer_jax.errors import ConfigError

log = logging.getLogger(__name__)

MODEL_TYPES = ("bpe", "unigram")


class Tokenizer:
  """Text <-> token ids, with EOS_ID appended on encoding and everything from EOS_ID on dropped
  on decoding. Picklable (it carries the serialised model), so grain workers can use it."""

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    with open(path, "rb") as f:
      return cls(f.read())

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model atomically, so a run killed mid-write leaves no truncated file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(self.model_proto)
    os.replace(tmp, path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def pieces(self) -> list[str]:
    """Every piece, by id."""
    return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

  def encode(self, text: str | bytes) -> list[int]:
    """One sentence -> token ids ending with EOS_ID."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return self._sp.encode(text) + [EOS_ID]

  def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
    texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
    return [ids + [EOS_ID] for ids in self._sp.encode(texts)]

  def decode(self, ids: Iterable[int]) -> str:
    """Token ids -> detokenized text; stops at the first EOS_ID and ignores padding and BOS_ID."""
    kept = []
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i not in (PAD_ID, BOS_ID):
        kept.append(i)
    return self._sp.decode(kept)

  def __getstate__(self):
    return {"model_proto": self.model_proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])


def train_tokenizer(sentences: Iterable[str | bytes], vocab_size: int, *, model_type: str = "bpe",
                    max_sentences: int = 2_000_000, seed: int = 0) -> Tokenizer:
  """Trains SentencePiece on `sentences` (source and target sides together, for a shared vocabulary).

  Args:
    sentences: training text, one sentence per item; the first `max_sentences` are used (pass
      them shuffled if the corpus is larger than that).
    vocab_size: the size of the vocabulary, special ids included.
    model_type: "bpe" (the paper) or "unigram".
    max_sentences: cap on the sentences read.
    seed: SentencePiece's random seed, for a reproducible vocabulary.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f"tokenizer model_type={model_type!r} is not one of {MODEL_TYPES}")
  text = (s.decode("utf-8") if isinstance(s, bytes) else s for s in sentences)
  text = (s for s in text if s.strip())
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    _train(text, model, vocab_size, model_type, max_sentences)
  except RuntimeError as e:  # SentencePiece's own checks, e.g. a vocabulary too small or too large.
    raise ConfigError(f"SentencePiece cannot train a {vocab_size}-piece {model_type} vocabulary "
                      f"on this text (model.vocab_size): {str(e).strip().splitlines()[-1]}") from e
  return Tokenizer(model.getvalue())


def _train(text: Iterable[str], model: io.BytesIO, vocab_size: int, model_type: str,
           max_sentences: int) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=itertools.islice(text, max_sentences),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=1.0,
      pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
      pad_piece="<pad>", eos_piece="</s>", bos_piece="<s>", unk_piece="<unk>",
      # Reversible: evaluation scores detokenized output against the raw references.
      normalization_rule_name="identity",
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
  )


def load_or_train_tokenizer(path: str | os.PathLike, sentences: Iterable[str | bytes],
                            vocab_size: int, **kwargs) -> Tokenizer:
  """The tokenizer saved at `path`, or a new one trained on `sentences` and saved there.

  A saved tokenizer whose size differs from `vocab_size` is an error rather than silently reused:
  the model's embedding is sized from the config.
  """
  if os.path.exists(path):
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size != vocab_size:
      raise ConfigError(
          f"the tokenizer at {path} has {tokenizer.vocab_size} pieces but model.vocab_size="
          f"{vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} or use a new workdir")
    log.info("Loaded the tokenizer from %s (%d pieces).", path, tokenizer.vocab_size)
    return tokenizer
  tokenizer = train_tokenizer(sentences, vocab_size, **kwargs)
  tokenizer.save(path)
  log.info("Trained a %d-piece tokenizer and saved it to %s.", tokenizer.vocab_size, path)
  return tokenizer
