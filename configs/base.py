"""Transformer base (Table 3, first row): N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1, 100K steps.

python train.py --config configs/base.py --config.model.num_heads=16   # any Table 3 variation
"""

from transformer_jax.config import base_config


def get_config():
  return base_config()
