"""Transformer base (Table 3, first row): N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1, 100K steps.

python train.py --config configs/base.py --config.model.num_heads=16   # any Table 3 variation

Every value below is the schema's default (`transformer_jax.config.base_config()`); they are set
here again so that the paper's numbers can be read in one place, and tests/test_config.py checks
that the two agree.
"""

from transformer_jax.config import base_config


def get_config():
  config = base_config()  # The schema: every field, locked, so a misspelled override fails.

  # The model, section 3 and Table 3. Source, target and pre-softmax projection always share one
  # embedding matrix (section 3.4); there is no field for it.
  config.model.vocab_size = 37000  # Shared source-target BPE vocabulary of about 37,000 (5.1).
  config.model.num_layers = 6  # N, in the encoder and in the decoder (3.1).
  config.model.d_model = 512
  config.model.d_ff = 2048  # Inner width of the feed-forward network (3.3).
  config.model.num_heads = 8  # h; d_k = d_v = d_model / h = 64 while model.d_k and d_v are unset.
  config.model.dropout_rate = 0.1  # P_drop, on sub-layer outputs and embedding sums (5.4).
  config.model.positional_encoding = "sinusoidal"  # Section 3.5 ("learned" is Table 3 row E).
  config.model.norm_position = "post"  # LayerNorm(x + Sublayer(x)) (3.1).
  config.model.max_len = 256  # Not the paper's: the longest position; data.max_len follows it.

  # Training, section 5.
  config.train.num_steps = 100_000  # 100K steps for base (5.2).
  config.train.schedule = "paper"  # d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5) (5.3).
  config.train.warmup_steps = 4000  # Section 5.3.
  config.train.adam_b1 = 0.9  # Adam's beta_1, beta_2 and epsilon (5.3).
  config.train.adam_b2 = 0.98
  config.train.adam_eps = 1e-9
  config.train.label_smoothing = 0.1  # epsilon_ls (5.4).
  config.train.checkpoints_to_average = 5  # The last 5 checkpoints, for base (6.1).

  # Data, section 5.1. The default corpus is the offline Bible; the paper's is WMT 2014 en-de:
  # --config.data.dataset=wmt14.
  config.data.dataset = "bible"
  config.data.source_lang = "en"
  config.data.target_lang = "de"
  config.data.tokenizer = "bpe"  # Byte-pair encoding (5.1).
  config.data.tokens_per_batch = 25_000  # About 25,000 source and 25,000 target tokens a batch.

  # Decoding, section 6.1.
  config.decode.beam_size = 4
  config.decode.length_penalty = 0.6  # alpha.
  config.decode.max_extra_len = 50  # Output length at most input length + 50.
  return config
