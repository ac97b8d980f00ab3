"""The input pipeline: tokenized corpus, token-budget batches, packing, per-process shards (grain).

Section 5.1: "Sentence pairs were batched together by approximate sequence length. Each training
batch contained a set of sentence pairs containing approximately 25000 source tokens and 25000
target tokens."

How it works. The corpus is tokenized once into flat token arrays, memory-mapped from an on-disk
cache (`token_cache`), so a batch is a few array slices and tokenization never slows training.
A *batch plan* decides, per
epoch and from the seed alone, which examples go in which batch: examples are bucketed by length
and each bucket is cut into batches of `tokens_per_batch // bucket_length` rows; or, with packing,
examples are packed first-fit into rows of `max_len` tokens. grain reads the plan as a random-access
dataset, so its iterator state is just a position, checkpointable with orbax, and a resumed run
sees exactly the next batches. Every batch is global: each process loads only its own slice of
rows, so the data seen does not depend on how many processes there are.

Batches are dicts of int32 arrays: `src` [n, L] and `tgt` [n, L] (PAD_ID = 0 after the end), and
with packing also `src_segments`, `src_positions`, `tgt_segments`, `tgt_positions`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Sequence

import grain
import numpy as np

from transformer_jax.constants import PAD_ID
from transformer_jax.data.token_cache import TokenizedCorpus
from transformer_jax.errors import DataError

Batch = dict[str, np.ndarray]


def bucket_boundaries(max_len: int) -> list[int]:
  """Row lengths of the buckets: steps of 8 up to 64, then about four buckets per doubling.

  Few enough distinct shapes to compile, fine enough that little of a batch is padding.
  """
  bounds, b = [], 8
  while b < max_len:
    bounds.append(b)
    b += max(8, 2 ** (int(math.log2(b)) - 2))
  return bounds + [max_len]


def round_down(value: int, multiple: int) -> int:
  return max(multiple, value // multiple * multiple)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """Which examples make up each batch of one epoch, as arrays (an epoch of 40M examples is a few
  hundred MB of int64 and is planned in seconds).

  Batch b is rows `batch_starts[b]` to `batch_starts[b + 1] - 1`; row r holds the examples
  `examples[row_starts[r]:row_starts[r + 1]]` (several when packed), or `examples[r]` alone when
  `row_starts` is None. `lengths[b]` is the row length L of batch b and `sizes[b]` its number of
  rows n, padding rows included (every batch of a bucket has the same shape, so few shapes compile).
  """

  examples: np.ndarray
  batch_starts: np.ndarray
  lengths: np.ndarray
  sizes: np.ndarray
  row_starts: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.lengths)

  def batch_rows(self, b: int) -> list[tuple[int, ...]]:
    """Batch b's rows, each a tuple of example indices."""
    first, last = int(self.batch_starts[b]), int(self.batch_starts[b + 1])
    if self.row_starts is None:
      return [(int(i),) for i in self.examples[first:last]]
    starts = self.row_starts[first:last + 1]
    return [tuple(int(i) for i in self.examples[starts[r]:starts[r + 1]]) for r in range(last - first)]

  @property
  def rows(self) -> list[list[tuple[int, ...]]]:
    """Every batch's rows (for inspection; `batch_rows` reads one batch)."""
    return [self.batch_rows(b) for b in range(len(self))]


def keep_indices(corpus: TokenizedCorpus, max_len: int) -> tuple[np.ndarray, int]:
  """The examples whose two sides both fit in `max_len` tokens, and how many were dropped."""
  fits = (corpus.src_lengths <= max_len) & (corpus.tgt_lengths <= max_len)
  return np.flatnonzero(fits), int((~fits).sum())


def plan_bucketed(corpus: TokenizedCorpus, indices: np.ndarray, tokens_per_batch: int,
                  max_len: int, multiple_of: int, rng: np.random.Generator | None) -> BatchPlan:
  """Buckets examples by length; each bucket is cut into batches of at most `tokens_per_batch`
  padded tokens per side. With `rng`, examples and then batches are shuffled; without, the order
  is deterministic (for evaluation). Nothing is dropped: a bucket's last batch has padding rows."""
  bounds = np.asarray(bucket_boundaries(max_len))
  longest = np.maximum(corpus.src_lengths[indices], corpus.tgt_lengths[indices])
  if rng is not None:
    order = rng.permutation(len(indices))
    indices, longest = indices[order], longest[order]
  bucket_of = np.searchsorted(bounds, longest)
  # Batches in bucket order: batch j takes counts[j] examples from members[starts[j]:], all of one
  # bucket. A stable sort by bucket keeps each bucket's (shuffled) order.
  members = indices[np.argsort(bucket_of, kind="stable")]
  per_bucket = np.bincount(bucket_of, minlength=len(bounds))
  bucket_start = np.concatenate([[0], np.cumsum(per_bucket)])
  starts, counts, lengths, sizes = [], [], [], []
  for b, length in enumerate(bounds):
    total = int(per_bucket[b])
    if not total:
      continue
    n = round_down(tokens_per_batch // int(length), multiple_of)
    if rng is None:
      # Evaluation: a bucket with fewer examples than a batch gets a smaller batch (translating
      # three sentences should not decode a full batch of padding rows).
      n = min(n, -(-total // multiple_of) * multiple_of)
    first = np.arange(0, total, n)
    starts.append(bucket_start[b] + first)
    counts.append(np.minimum(n, total - first))
    lengths.append(np.full(len(first), length, np.int32))
    sizes.append(np.full(len(first), n, np.int32))
  if not starts:
    return BatchPlan(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32))
  starts, counts, lengths, sizes = map(np.concatenate, (starts, counts, lengths, sizes))
  if rng is not None:
    order = rng.permutation(len(starts))
    starts, counts, lengths, sizes = starts[order], counts[order], lengths[order], sizes[order]
  batch_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  # The examples of batch after batch: each batch's slice of `members`, gathered in one step.
  take = np.repeat(starts - batch_starts[:-1], counts) + np.arange(batch_starts[-1])
  return BatchPlan(members[take].astype(np.int64), batch_starts, lengths, sizes)


def plan_packed(corpus: TokenizedCorpus, indices: np.ndarray, tokens_per_batch: int,
                max_len: int, multiple_of: int, rng: np.random.Generator | None,
                open_rows: int = 64) -> BatchPlan:
  """Packs examples first-fit into rows of `max_len` tokens (both sides must fit), keeping at most
  `open_rows` rows open; batches have `tokens_per_batch // max_len` rows, all of one shape."""
  if rng is not None:
    indices = indices[rng.permutation(len(indices))]
  src_len, tgt_len = corpus.src_lengths, corpus.tgt_lengths
  done: list[tuple[int, ...]] = []
  open_: list[list] = []  # [examples, src_used, tgt_used]
  for i in indices:
    s, t = int(src_len[i]), int(tgt_len[i])
    for row in open_:
      if row[1] + s <= max_len and row[2] + t <= max_len:
        row[0].append(int(i)); row[1] += s; row[2] += t
        break
    else:
      if len(open_) == open_rows:
        done.append(tuple(open_.pop(0)[0]))
      open_.append([[int(i)], s, t])
  done += [tuple(row[0]) for row in open_]
  n = round_down(tokens_per_batch // max_len, multiple_of)
  row_starts = np.concatenate([[0], np.cumsum([len(row) for row in done], dtype=np.int64)])
  examples = np.fromiter((i for row in done for i in row), np.int64, int(row_starts[-1]))
  batch_starts = np.append(np.arange(0, len(done), n), len(done)).astype(np.int64)
  batches = len(batch_starts) - 1
  return BatchPlan(examples, batch_starts, np.full(batches, max_len, np.int32),
                   np.full(batches, n, np.int32), row_starts)


def assemble(corpus: TokenizedCorpus, rows: Sequence[tuple[int, ...]], length: int, size: int,
             packed: bool) -> Batch:
  """The arrays of a batch: `rows` padded to [size, length] with PAD_ID (and empty rows)."""
  batch = {k: np.full((size, length), PAD_ID, np.int32) for k in ("src", "tgt")}
  if packed:
    for k in ("src_segments", "src_positions", "tgt_segments", "tgt_positions"):
      batch[k] = np.zeros((size, length), np.int32)
  for r, row in enumerate(rows):
    for side, get in (("src", corpus.source), ("tgt", corpus.target)):
      pos = 0
      for segment, i in enumerate(row, start=1):
        tokens = get(i)
        batch[side][r, pos:pos + len(tokens)] = tokens
        if packed:
          batch[f"{side}_segments"][r, pos:pos + len(tokens)] = segment
          batch[f"{side}_positions"][r, pos:pos + len(tokens)] = np.arange(len(tokens))
        pos += len(tokens)
  return batch


class EpochBatches:
  """Random access to the batches of consecutive epochs: item k is the k-th batch of the run.

  Epoch e's plan is drawn from a generator seeded with (seed, e), so any batch can be rebuilt from
  its index alone; that index is all that grain's iterator state needs to hold. Each item is this
  process's slice of the global batch's rows.
  """

  def __init__(self, corpus: TokenizedCorpus, indices: np.ndarray, *, tokens_per_batch: int,
               max_len: int, packing: bool, seed: int, shuffle: bool, num_epochs: int | None,
               multiple_of: int = 1, process_index: int = 0, process_count: int = 1):
    if multiple_of % process_count:
      raise ValueError(f"multiple_of={multiple_of} must be a multiple of process_count={process_count}")
    self.corpus, self.indices = corpus, indices
    self.tokens_per_batch, self.max_len, self.packing = tokens_per_batch, max_len, packing
    self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
    self.multiple_of, self.process_index, self.process_count = multiple_of, process_index, process_count
    self._epoch_starts = [0]  # Index of the first batch of each planned epoch, cumulative.
    self._lock = threading.Lock()  # grain reads items from several threads.
    self._plans: dict[int, BatchPlan] = {}

  @classmethod
  def single_pass(cls, corpus: TokenizedCorpus, indices: np.ndarray, *, tokens_per_batch: int,
                  max_len: int, packing: bool = False, multiple_of: int = 1, process_index: int = 0,
                  process_count: int = 1) -> EpochBatches:
    """Every example of `indices` exactly once, never shuffled or dropped: the batches of
    evaluation and translation. Bucketed by length and padded, or packed (for the loss only:
    one batch shape, so one compilation, and less padding)."""
    return cls(corpus, np.asarray(indices), tokens_per_batch=tokens_per_batch, max_len=max_len,
               packing=packing, seed=0, shuffle=False, num_epochs=1, multiple_of=multiple_of,
               process_index=process_index, process_count=process_count)

  def plan(self, epoch: int) -> BatchPlan:
    """Epoch `epoch`'s plan; the two most recent are kept (reading crosses one boundary at a time)."""
    if epoch not in self._plans:
      rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
      make = plan_packed if self.packing else plan_bucketed
      plan = make(self.corpus, self.indices, self.tokens_per_batch, self.max_len, self.multiple_of, rng)
      self._plans = {**{e: p for e, p in self._plans.items() if e >= epoch - 1}, epoch: plan}
    return self._plans[epoch]

  def _locate(self, k: int) -> tuple[int, int]:
    """(epoch, batch within the epoch) of the run's k-th batch."""
    with self._lock:
      while self._epoch_starts[-1] <= k:
        epoch = len(self._epoch_starts) - 1
        if self.num_epochs is not None and epoch >= self.num_epochs:
          raise IndexError(k)
        batches = len(self.plan(epoch))
        if not batches:  # Without this, an endless run would look for its next batch forever.
          raise DataError(
              f"no batch can be made from {len(self.indices)} examples with max_len="
              f"{self.max_len} and tokens_per_batch={self.tokens_per_batch}: check that some "
              "examples fit data.max_len")
        self._epoch_starts.append(self._epoch_starts[-1] + batches)
      epoch = int(np.searchsorted(self._epoch_starts, k, side="right")) - 1
      return epoch, k - self._epoch_starts[epoch]

  def __getstate__(self):  # Locks do not pickle (grain workers get a copy of this object).
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    if self.num_epochs is None:
      return np.iinfo(np.int64).max  # Endless: training stops by step count.
    return sum(len(self.plan(epoch)) for epoch in range(self.num_epochs))

  def __getitem__(self, k: int) -> Batch:
    epoch, b = self._locate(int(k))
    plan = self.plan(epoch)
    size = int(plan.sizes[b]) // self.process_count
    lo = self.process_index * size
    batch = assemble(self.corpus, plan.batch_rows(b)[lo:lo + size], int(plan.lengths[b]), size,
                     self.packing)
    batch["epoch"] = np.int32(epoch)
    return batch


def make_dataset(batches: EpochBatches, *, num_workers: int = 0, prefetch: int = 4) -> grain.IterDataset:
  """A grain dataset over the run's batches; `iter()` it, and checkpoint the iterator's state."""
  ds = grain.MapDataset.source(batches).to_iter_dataset(
      grain.ReadOptions(num_threads=max(1, prefetch // 2), prefetch_buffer_size=prefetch))
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def padding_fraction(batch: Batch) -> float:
  """The share of the batch's token slots (both sides) that hold padding."""
  total = batch["src"].size + batch["tgt"].size
  real = np.count_nonzero(batch["src"]) + np.count_nonzero(batch["tgt"])
  return 1.0 - real / total
