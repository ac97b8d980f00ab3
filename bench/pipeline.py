"""Input pipeline throughput against the training step's consumption, on this machine.

  python -m bench.pipeline [--config configs/small.py] [--rounds 5]

Prints the target tokens per second that the grain pipeline delivers (batches assembled from the
tokenized corpus, with and without packing) beside the target tokens per second that the jitted
train step consumes, with medians over interleaved rounds. The ratio says how far input
preparation is from being the bottleneck. Uses the offline Bible corpus (prepared on first use).
"""

import argparse
import os
import statistics
import time

import jax
import numpy as np
from ml_collections import config_flags  # noqa: F401

from transformer_jax.cpu import cpu_description
from transformer_jax import experiment, sharding, steps
from transformer_jax.config import load_config_file
from transformer_jax.data import sources
from transformer_jax.data import pipeline


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def pipeline_rate(batches: pipeline.EpochBatches, start: int, count: int, num_workers: int = 0) -> float:
  """Real target tokens per second delivered by a fresh grain iterator reading `count` batches."""
  iterator = iter(pipeline.make_dataset(batches, num_workers=num_workers))
  iterator.set_state({"next_index": start})
  t0 = time.perf_counter()
  tokens = sum(int(np.count_nonzero(next(iterator)["tgt"])) for _ in range(count))
  return tokens / (time.perf_counter() - t0)


def step_rate(setup, state, batch, key, count: int) -> tuple[float, object]:
  tokens = int(np.count_nonzero(batch["tgt"]))
  device_batch = setup.put_batch(batch)
  t0 = time.perf_counter()
  for _ in range(count):
    state, metrics = setup.train_step(state, device_batch, key)
  jax.block_until_ready(metrics)
  return tokens * count / (time.perf_counter() - t0), state


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/small.py")
  parser.add_argument("--workdir", default="/tmp/transformer_jax_bench_pipeline")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  config = load_config_file(args.config)
  setup = steps.make_setup(config)
  train_raw = sources.load_split(config.data, "train")
  tokenizer = experiment.load_tokenizer(config, args.workdir, train_raw)
  t0 = time.perf_counter()
  split = experiment.load_split(config, args.workdir, "train", tokenizer)
  print(f"corpus: {len(split.corpus):,} examples, tokenized (or loaded from cache) in "
        f"{time.perf_counter() - t0:.1f} s")
  variants = {}
  for packing in (False, True):
    variants["packed" if packing else "bucketed"] = pipeline.EpochBatches(
        split.corpus, split.indices, tokens_per_batch=config.data.tokens_per_batch,
        max_len=config.data.max_len, packing=packing, seed=0, shuffle=True, num_epochs=None,
        multiple_of=sharding.batch_multiple(setup.mesh))
  packed = variants["packed"]
  state, key = setup.init_state(0), jax.random.key(0)
  _, state = step_rate(setup, state, packed[0], key, 1)  # Compile (the state is donated).
  results = {name: [] for name in variants}
  results["train step"] = []
  for r in range(args.rounds):  # Interleaved, so machine noise hits every variant alike.
    for name, batches in variants.items():
      results[name].append(pipeline_rate(batches, r * args.batches, args.batches))
    rate, state = step_rate(setup, state, packed[r], key, args.steps)
    results["train step"].append(rate)
  consume = statistics.median(results["train step"])
  print(f"\nCPU: {cpu_description()}")
  print(f"{'':<22}{'target tok/s (median)':>24}{'x train step':>16}")
  for name, rates in results.items():
    median = statistics.median(rates)
    print(f"{name:<22}{median:>24,.0f}{median / consume:>15.1f}x")
  print(f"\nconfig {args.config}: {config.data.tokens_per_batch} tokens per batch, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), {args.rounds} rounds")


if __name__ == "__main__":
  main()
