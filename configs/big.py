"""Transformer big (Table 3, last row): d_model=1024, d_ff=4096, h=16, P_drop=0.3, 300K steps.

For English-French the paper used P_drop=0.1: --config.model.dropout_rate=0.1.
"""

import pathlib

from transformer_jax.config import load_config_file


def get_config():
  # configs/ is not a package (train.py and transformer-compile load these files by path, from any
  # directory), so base.py is loaded by its path too.
  config = load_config_file(pathlib.Path(__file__).with_name("base.py"))

  # What Table 3's big row changes; N=6, d_k = d_v = 64 and epsilon_ls=0.1 stay base's.
  config.model.d_model = 1024
  config.model.d_ff = 4096
  config.model.num_heads = 16
  config.model.dropout_rate = 0.3  # P_drop (5.4).
  config.train.num_steps = 300_000  # 300K steps, 3.5 days on 8 P100s (5.2).
  config.train.checkpoints_to_average = 20  # The last 20 checkpoints, for big (6.1).
  return config
