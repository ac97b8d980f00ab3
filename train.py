"""Entry point: `python train.py --config configs/small.py --workdir runs/small`.

Training lands with the trainer (issue 4). Until then this builds the configured model, counts its
parameters and runs one forward pass on a made-up batch, so that the set-up can be checked end to end.
"""

import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from transformer_jax import Transformer, TransformerConfig

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/small.py", "Config file; override fields with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (used once training lands).")


def main(argv):
  del argv
  config = _CONFIG.value
  model_config = TransformerConfig.from_config(config.model)  # Validates before any tracing.
  print(f"devices: {jax.devices()}")
  print(f"model: {model_config}")

  model = Transformer(model_config)
  rng = np.random.default_rng(config.seed)
  src = jnp.asarray(rng.integers(4, model_config.vocab_size, (8, 32)), jnp.int32)
  tgt = jnp.asarray(rng.integers(4, model_config.vocab_size, (8, 32)), jnp.int32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(config.seed), src, tgt))["params"]
  count = sum(x.size for x in jax.tree.leaves(params))
  print(f"parameters: {count:,}")

  forward = jax.jit(lambda p, s, t: model.apply({"params": p}, s, t))
  logits = forward(params, src, tgt).block_until_ready()
  start = time.perf_counter()
  logits = forward(params, src, tgt).block_until_ready()
  elapsed = time.perf_counter() - start
  print(f"forward pass: logits {logits.shape} {logits.dtype} in {elapsed * 1e3:.1f} ms "
        f"({src.size / elapsed:,.0f} target tokens/s)")
  print("Training is not implemented yet: this run only checks that the model builds and runs.")


if __name__ == "__main__":
  app.run(main)
