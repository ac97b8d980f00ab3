"""Transformer big (Table 3, last row): d_model=1024, d_ff=4096, h=16, P_drop=0.3, 300K steps.

For English-French the paper used P_drop=0.1: --config.model.dropout_rate=0.1.
"""

from transformer_jax.config import base_config


def get_config():
  config = base_config()
  config.model.d_model = 1024
  config.model.d_ff = 4096
  config.model.num_heads = 16
  config.model.dropout_rate = 0.3
  config.train.num_steps = 300_000
  config.train.checkpoints_to_average = 20  # Section 6.1.
  return config
