"""What dropout costs a train step: ours against flax's `nn.Dropout`, the `rbg` PRNG and none.

  python -m bench.dropout [--size base] [--batch 8x128] [--rounds 7]
  python -m bench.dropout --batch 200x128 --dtype bfloat16 --attention_impl cudnn   # a GPU

`layers.Dropout` takes 16 random bits per unit (two per threefry word); flax's `nn.Dropout`, the
peer, takes a 32-bit word per unit. The script compiles the train step of one config four ways
(ours; flax's; flax's with keys of the `rbg` PRNG, whose bits come from XLA's RngBitGenerator;
dropout rate 0) in one process, then runs one step of each in turn, `--rounds` times, so that the
machine's noise hits all four alike, and prints the median step times and their ratio to the step
without dropout. flax's module is swapped in by patching `transformer_jax.model.Dropout` while
that variant is traced; the rest of the step is the same code.
"""

import argparse
import contextlib
import os
import statistics
import time

from transformer_jax.cpu import cpu_description
from transformer_jax import cpu, steps

import flax.linen as nn
import jax
import numpy as np

from bench.pipeline import CONFIGS
from transformer_jax.config import load_config_file
from transformer_jax import model as model_module

# name: (dropout module, PRNG, dropout rate or None for the config's).
VARIANTS = {
    "ours (16 bits a unit)": (model_module.Dropout, "threefry2x32", None),
    "flax nn.Dropout (32 bits)": (nn.Dropout, "threefry2x32", None),
    "flax nn.Dropout, rbg PRNG": (nn.Dropout, "rbg", None),
    "no dropout": (model_module.Dropout, "threefry2x32", 0.0),
}


@contextlib.contextmanager
def dropout_module(cls):
  saved = model_module.Dropout
  model_module.Dropout = cls
  try:
    yield
  finally:
    model_module.Dropout = saved


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="base", help="small, base or big (configs/SIZE.py)")
  parser.add_argument("--batch", default="8x128", help="ROWSxLENGTH per side")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--attention_impl", default="einsum", choices=("einsum", "dot_product", "cudnn"))
  args = parser.parse_args()
  cpu.keep_cpu_step_memory()  # As train.py does.
  rows, length = map(int, args.batch.lower().split("x"))

  runs = {}
  for name, (cls, impl, rate) in VARIANTS.items():
    config = load_config_file(os.path.join(CONFIGS, f"{args.size}.py"))
    config.model.update(dtype=args.dtype, attention_impl=args.attention_impl)
    if rate is not None:
      config.model.dropout_rate = rate
    setup = steps.make_setup(config)
    rng = np.random.default_rng(0)
    src, tgt = (rng.integers(4, config.model.vocab_size, (rows, length)).astype(np.int32)
                for _ in range(2))
    batch = setup.put_batch({"src": src, "tgt": tgt})
    key = jax.random.key(config.seed, impl=impl)
    with dropout_module(cls):  # The first call traces and compiles.
      state, _ = setup.train_step(setup.init_state(0), batch, key)
    jax.block_until_ready(state)
    runs[name] = {"setup": setup, "state": state, "batch": batch, "key": key, "times": [],
                  "rate": config.model.dropout_rate}

  for _ in range(args.rounds):
    for run in runs.values():
      t0 = time.perf_counter()
      run["state"], metrics = run["setup"].train_step(run["state"], run["batch"], run["key"])
      jax.block_until_ready((run["state"], metrics))
      run["times"].append(time.perf_counter() - t0)

  print(f"\nCPU: {cpu_description()}")
  print(f"{args.size}, batch {rows}x{length}, {args.dtype}, attention_impl={args.attention_impl}, "
        f"jax {jax.__version__} ({jax.devices()[0].device_kind}), medians of {args.rounds} "
        "interleaved steps\n")
  reference = statistics.median(runs["no dropout"]["times"])
  print(f"{'variant':<28}{'rate':>6}{'ms/step':>10}{'x no dropout':>14}")
  for name, run in runs.items():
    median = statistics.median(run["times"])
    print(f"{name:<28}{run['rate']:>6.2f}{median * 1e3:>10.1f}{median / reference:>13.3f}x")


if __name__ == "__main__":
  main()
