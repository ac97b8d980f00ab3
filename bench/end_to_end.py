"""Real target tokens per second of training on the offline corpus: our batching against padding.

  python -m bench.end_to_end [--config configs/small.py] [--rounds 3] [--steps 8]

Trains the same model (the config's) on the Bible en-de training split with three ways of making
batches of the same token budget (`data.tokens_per_batch` per side):

  packed     the project's default for the quick start: several examples per row of max_len
             tokens (`data.packing=true`), one batch shape;
  bucketed   examples bucketed by length, each bucket cut into batches of at most the budget
             (`data.packing=false`), one batch shape per bucket;
  padded     the plain baseline: examples in random order, every row padded to max_len, as many
             rows as the budget allows (tokens_per_batch // max_len).

The process is set up as train.py sets it up (`cpu.keep_cpu_step_memory()`). Every batch
shape is compiled first; then each variant runs `--steps` steps a round, the variants
alternating, and the script prints the medians of real (non-padding) target tokens per second and
the ratio to the padded baseline. Batches are assembled before the timed steps (bench/pipeline.py
shows that assembling them is hundreds of times faster than the step).
"""

import argparse
import statistics
import time

import jax
import numpy as np

from transformer_jax.cpu import cpu_description
from transformer_jax.config import load_config_file
from transformer_jax import cpu, experiment, sharding, steps
from transformer_jax.data import sources
from transformer_jax.data import pipeline, token_cache


def padded_batches(corpus: token_cache.TokenizedCorpus, indices: np.ndarray, rows: int, max_len: int,
                   seed: int):
  """The baseline: shuffled examples, `rows` per batch, each row padded to `max_len`."""
  order = indices[np.random.default_rng(seed).permutation(len(indices))]
  for start in range(0, len(order) - rows + 1, rows):
    yield pipeline.assemble(corpus, [(int(i),) for i in order[start:start + rows]], max_len, rows,
                            packed=False)


def model_batch(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if np.ndim(v) == 2}


def run_steps(setup, state, key, batches: list[dict]):
  """Runs the steps back to back, as the training loop does; returns (seconds, real tokens, state)."""
  tokens = sum(int(np.count_nonzero(b["tgt"])) for b in batches)
  t0 = time.perf_counter()
  for batch in batches:
    state, metrics = setup.train_step(state, setup.put_batch(batch), key)
  jax.block_until_ready((state, metrics))
  return time.perf_counter() - t0, tokens, state


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/small.py")
  parser.add_argument("--workdir", default="/tmp/bench_e2e")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=8, help="steps per variant per round")
  args = parser.parse_args()
  cpu.keep_cpu_step_memory()  # As train.py does, before JAX starts its backends.
  config = load_config_file(args.config)
  setup = steps.make_setup(config)
  train_raw = sources.load_split(config.data, "train")
  tokenizer = experiment.load_tokenizer(config, args.workdir, train_raw)
  split = experiment.load_split(config, args.workdir, "train", tokenizer)
  budget, max_len = config.data.tokens_per_batch, config.data.max_len
  multiple = sharding.batch_multiple(setup.mesh)

  needed = args.rounds * args.steps
  variants = {}
  for name, packing in (("packed", True), ("bucketed", False)):
    batches = pipeline.EpochBatches(split.corpus, split.indices, tokens_per_batch=budget,
                                    max_len=max_len, packing=packing, seed=config.seed,
                                    shuffle=True, num_epochs=None, multiple_of=multiple)
    variants[name] = [model_batch(batches[k]) for k in range(needed)]
  rows = pipeline.round_down(budget // max_len, multiple)
  stream = padded_batches(split.corpus, split.indices, rows, max_len, config.seed)
  variants["padded"] = [next(stream) for _ in range(needed)]

  state, key = setup.init_state(config.seed), jax.random.key(config.seed)
  t0 = time.perf_counter()
  shapes = {}
  for name, batches in variants.items():  # Compile every shape outside the timed rounds.
    for batch in batches:
      shape = tuple(batch["tgt"].shape) + (len(batch),)
      if shape not in shapes:
        shapes[shape] = name
        _, _, state = run_steps(setup, state, key, [batch])
  print(f"compiled {len(shapes)} batch shapes in {time.perf_counter() - t0:.0f} s "
        f"(bucketed: {sum(1 for v in shapes.values() if v == 'bucketed')})")

  rates = {name: [] for name in variants}
  seconds_per_step = {name: [] for name in variants}
  for r in range(args.rounds):  # Interleaved, so machine noise hits every variant alike.
    for name, batches in variants.items():
      seconds, tokens, state = run_steps(setup, state, key, batches[r * args.steps:(r + 1) * args.steps])
      rates[name].append(tokens / seconds)
      seconds_per_step[name].append(seconds / args.steps)

  baseline = statistics.median(rates["padded"])
  print(f"\nCPU: {cpu_description()}")
  print(f"{config.model.num_layers} layers, d_model {config.model.d_model}, {budget} tokens per "
        f"batch per side, max_len {max_len}; {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s); {args.steps} steps a round, medians of {args.rounds} interleaved rounds\n")
  print(f"{'':<10}{'batch shapes':>18}{'padding':>9}{'s/step':>8}{'real tgt tok/s':>16}{'x padded':>10}")
  for name, batches in variants.items():
    shapes_seen = sorted({b["tgt"].shape for b in batches})
    shape_text = f"{shapes_seen[0][0]}x{shapes_seen[0][1]}" if len(shapes_seen) == 1 else f"{len(shapes_seen)} shapes"
    padding = float(np.mean([pipeline.padding_fraction(b) for b in batches]))
    rate = statistics.median(rates[name])
    print(f"{name:<10}{shape_text:>18}{padding:>9.1%}{statistics.median(seconds_per_step[name]):>8.2f}"
          f"{rate:>16,.0f}{rate / baseline:>9.2f}x")


if __name__ == "__main__":
  main()
