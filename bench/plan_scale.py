"""Epoch plans at WMT scale: the array-based bucketed plan against the list-based plan it replaced.

  python -m bench.plan_scale [--sizes 4500000,40000000] [--list_max 4500000]

WMT 2014 en-de has 4.5M sentence pairs, en-fr 36M. A training process plans each epoch (which
examples go in which batch, drawn from the seed) and holds up to two plans. This times
`pipeline.plan_bucketed` (numpy arrays) and `list_plan` (the pipeline's first version: Python lists
of tuples, kept here as the reference the tests check the array plan against) on synthetic
lengths (log-normal, median about 25 tokens, as WMT's are), 25,000 tokens per batch, rows of at
most 256 tokens, 8 data-parallel shards, and prints the time and the memory each plan holds
(array bytes; for lists, the process's RSS growth). Only the lengths exist: no tokens are made.
"""

import argparse
import os
import resource
import time

import numpy as np

from transformer_jax.cpu import cpu_description
from transformer_jax.data import pipeline, token_cache


def list_plan(corpus, indices, tokens_per_batch, max_len, multiple_of, rng):
  """The bucketed plan as the pipeline first built it: (rows, lengths, sizes) as Python lists, each
  row a tuple of example indices. Same batches as `pipeline.plan_bucketed`."""
  bounds = np.asarray(pipeline.bucket_boundaries(max_len))
  longest = np.maximum(corpus.src_lengths[indices], corpus.tgt_lengths[indices])
  if rng is not None:
    order = rng.permutation(len(indices))
    indices, longest = indices[order], longest[order]
  bucket_of = np.searchsorted(bounds, longest)
  rows, lengths, sizes = [], [], []
  for b, length in enumerate(bounds):
    members = indices[bucket_of == b]
    if not len(members):
      continue
    n = pipeline.round_down(tokens_per_batch // int(length), multiple_of)
    if rng is None:
      n = min(n, -(-len(members) // multiple_of) * multiple_of)
    for start in range(0, len(members), n):
      rows.append([(int(i),) for i in members[start:start + n]])
      lengths.append(int(length))
      sizes.append(n)
  if rng is not None:
    order = rng.permutation(len(rows))
    rows, lengths, sizes = [rows[i] for i in order], [lengths[i] for i in order], [sizes[i] for i in order]
  return rows, lengths, sizes


def synthetic_corpus(n: int, seed: int = 0) -> token_cache.TokenizedCorpus:
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.lognormal(3.2, 0.6, n).astype(np.int64), 2, 400)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  return token_cache.TokenizedCorpus(np.zeros(1, np.uint16), offsets, np.zeros(1, np.uint16), offsets)


def rss_gb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="4500000,40000000")
  parser.add_argument("--list_max", type=int, default=4_500_000, help="largest size for the list plan")
  args = parser.parse_args()
  print(f"CPU: {cpu_description()}")
  print(f"{'examples':>12}{'plan':>8}{'seconds':>10}{'held GB':>10}{'batches':>10}")
  for n in map(int, args.sizes.split(",")):
    corpus = synthetic_corpus(n)
    indices, _ = pipeline.keep_indices(corpus, 256)
    start = time.perf_counter()
    plan = pipeline.plan_bucketed(corpus, indices, 25_000, 256, 8, np.random.default_rng([0, 0]))
    seconds = time.perf_counter() - start
    held = sum(a.nbytes for a in (plan.examples, plan.batch_starts, plan.lengths, plan.sizes)) / 1e9
    print(f"{n:>12,}{'arrays':>8}{seconds:>10.1f}{held:>10.2f}{len(plan):>10,}")
    del plan
    if n <= args.list_max:
      before = rss_gb()
      start = time.perf_counter()
      rows, _, _ = list_plan(corpus, indices, 25_000, 256, 8, np.random.default_rng([0, 0]))
      seconds = time.perf_counter() - start
      print(f"{n:>12,}{'lists':>8}{seconds:>10.1f}{rss_gb() - before:>10.2f}{len(rows):>10,}")
      del rows
  print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
  main()
