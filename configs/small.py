"""A small Transformer sized for a 2-core CPU: the offline quick start's model.

Same architecture and training recipe as base, narrower and shallower: N=3, d_model=256,
d_ff=1024, h=4 (d_k=64 as in base), an 8,000-token vocabulary, short sequences, a shorter warm-up
and smaller batches.
"""

from transformer_jax.config import base_config


def get_config():
  config = base_config()
  config.model.vocab_size = 8000
  config.model.d_model = 256
  config.model.d_ff = 1024
  config.model.num_heads = 4
  config.model.num_layers = 3
  config.model.max_len = 128
  config.train.num_steps = 6000
  config.train.warmup_steps = 1000
  config.data.tokens_per_batch = 4096
  return config
