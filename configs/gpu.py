"""The offline quick start on one NVIDIA GPU: configs/small.py's model and recipe, in bfloat16 with
cuDNN's fused attention, held to a number of steps instead of 30 minutes.

  python train.py --config configs/gpu.py --workdir runs/gpu

The model, data, batch and schedule are the CPU quick start's (its values were chosen on
validation, configs/small.py says how). What changes, and why:
- bfloat16 products and cuDNN attention (`model.attention_impl="cudnn"`: Ampere and newer, compute
  capability 8.0; on an older GPU pass --config.model.attention_impl=dot_product). Logits, softmax,
  loss, parameters and Adam stay in float32.
- 2,000 steps rather than a time budget. On a CPU 30 minutes are 900 to 1,750 steps of 4,096
  tokens, about 7 epochs of the corpus, and the recipe (no dropout, the cooldown) was tuned for
  that; a GPU would run hundreds of epochs in 30 minutes and only memorise. 2,000 steps are about
  8 epochs, a little past the fastest CPU run (1,748 steps, test sacreBLEU 28.6). The cooldown takes
  the last 20% of the steps.
- Fewer checkpoints: a save every 100 steps costs more than the steps between them on a GPU.
"""

import pathlib

from transformer_jax.config import load_config_file


def get_config():
  config = load_config_file(pathlib.Path(__file__).with_name("small.py"))  # By path, as big.py.
  config.model.dtype = "bfloat16"
  config.model.attention_impl = "cudnn"
  config.train.time_budget_minutes = 0.0
  config.train.num_steps = 2000
  config.train.checkpoint_every = 500
  return config
