"""A tokenized parallel corpus as flat token arrays, and its on-disk cache.

The corpus is tokenized once (in several processes for large corpora) and kept as four arrays:
both sides' tokens end to end and the offsets where each example starts. They are cached as .npy
files in a directory that every later run memory-maps, so a host's memory does not grow with the
corpus: the pages a batch touches are read, and the kernel may drop them again. The directory may
be on an object store (gs://); each host then maps a local copy.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
from collections.abc import Sequence

import numpy as np

from transformer_jax import paths
from transformer_jax.data import sources

CORPUS_ARRAYS = ("src", "src_offsets", "tgt", "tgt_offsets")  # TokenizedCorpus's fields, in order.


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
  """Both sides of a parallel corpus as flat token arrays: example i is src[src_offsets[i]:...]."""

  src: np.ndarray
  src_offsets: np.ndarray
  tgt: np.ndarray
  tgt_offsets: np.ndarray

  def __len__(self) -> int:
    return len(self.src_offsets) - 1

  @property
  def src_lengths(self) -> np.ndarray:
    return np.diff(self.src_offsets)

  @property
  def tgt_lengths(self) -> np.ndarray:
    return np.diff(self.tgt_offsets)

  def source(self, i: int) -> np.ndarray:
    return self.src[self.src_offsets[i]:self.src_offsets[i + 1]]

  def target(self, i: int) -> np.ndarray:
    return self.tgt[self.tgt_offsets[i]:self.tgt_offsets[i + 1]]

  def __reduce__(self):
    # Memory-mapped arrays travel (to grain's worker processes) as their file names, not as copies.
    files = [getattr(getattr(self, k), "filename", None) for k in CORPUS_ARRAYS]
    if all(files):
      return _map_files, tuple(files)
    return TokenizedCorpus, tuple(getattr(self, k) for k in CORPUS_ARRAYS)


def _map_files(*files: str) -> TokenizedCorpus:
  return TokenizedCorpus(*(np.load(f, mmap_mode="r") for f in files))


CACHE_MARKER = "corpus.json"  # Written last: a cache directory without it is incomplete.


def is_corpus_cache(cache_path: paths.PathLike) -> bool:
  """Whether `cache_path` holds a complete token cache (a local or remote directory)."""
  return (paths.resolve(cache_path) / CACHE_MARKER).exists()


def load_corpus_cache(cache_path: paths.PathLike, local_dir: str | None = None) -> TokenizedCorpus:
  """A tokenized corpus cache (a directory of .npy files), memory-mapped read-only; a remote
  cache (gs://...) is first copied to `local_dir` (default: the temporary directory) on this host."""
  local = paths.local_copy(cache_path, local_dir)
  return TokenizedCorpus(**{k: np.load(os.path.join(local, f"{k}.npy"), mmap_mode="r")
                            for k in CORPUS_ARRAYS})


def save_corpus_cache(corpus: TokenizedCorpus, cache_path: paths.PathLike) -> None:
  """Writes the arrays, then the marker that makes the directory a cache (local or remote)."""
  path = paths.resolve(cache_path)
  path.mkdir(parents=True, exist_ok=True)
  for name in CORPUS_ARRAYS:
    with (path / f"{name}.npy").open("wb") as f:
      np.save(f, getattr(corpus, name))
  paths.write_text_atomic(path / CACHE_MARKER, json.dumps(
      {"examples": len(corpus), "src_tokens": len(corpus.src), "tgt_tokens": len(corpus.tgt),
       "dtype": str(corpus.src.dtype)}))


def tokenize_corpus(examples: Sequence[dict], source_lang: str, target_lang: str, tokenizer, *,
                    cache_path: paths.PathLike | None = None, chunk_size: int = 4096,
                    processes: int = 1, local_dir: str | None = None) -> TokenizedCorpus:
  """Tokenizes every example once (EOS_ID appended to both sides); reuses `cache_path` if present.

  Args:
    examples: random-access examples, each a dict mapping language codes to UTF-8 bytes (a tfds
      data source, or anything picklable with a length and indexing).
    source_lang: the key of the source side.
    target_lang: the key of the target side.
    tokenizer (Tokenizer): a `transformer_jax.tokenizer.Tokenizer` (or `MarianVocabTokenizer`).
    cache_path: a directory (local or gs://...) to memory-map the arrays from, or to write them to
      after tokenizing and then map.
    chunk_size: examples per unit of work.
    processes: worker processes that read and tokenize chunks side by side (0: one per core),
      used when there are at least 8 chunks per process; the result is the same for any number.
    local_dir: where a remote cache is copied to be memory-mapped.
  """
  if cache_path and is_corpus_cache(cache_path):
    return load_corpus_cache(cache_path, local_dir)
  dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32
  processes = processes or os.cpu_count() or 1
  ranges = [(start, min(start + chunk_size, len(examples)))
            for start in range(0, len(examples), chunk_size)]
  # Chunks become numpy arrays at once: Python lists of WMT's ~270M tokens would need >10 GB.
  # Starting a process costs seconds (it imports JAX), so small corpora are tokenized here.
  if processes > 1 and len(ranges) >= 8 * processes:
    # Never fork a process that runs JAX. Spawned processes import the caller's main module again,
    # so a script that tokenizes must keep its work under `if __name__ == "__main__":`.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        min(processes, len(ranges)), mp_context=context, initializer=_start_worker,
        initargs=(examples, source_lang, target_lang, tokenizer, dtype)) as pool:
      chunks = list(pool.map(_tokenize_range, ranges))
  else:
    _start_worker(examples, source_lang, target_lang, tokenizer, dtype)
    chunks = [_tokenize_range(r) for r in ranges]
  arrays = {}
  for k, side in enumerate(("src", "tgt")):
    lengths = np.concatenate([c[k][1] for c in chunks]) if chunks else np.zeros(0, np.int64)
    arrays[side + "_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arrays[side] = np.concatenate([c[k][0] for c in chunks]) if chunks else np.zeros(0, dtype)
  del chunks
  corpus = TokenizedCorpus(**arrays)
  if not cache_path:
    return corpus
  save_corpus_cache(corpus, cache_path)
  del corpus, arrays
  return load_corpus_cache(cache_path, local_dir)


_worker: dict = {}  # What a tokenizing process works on, set once by `_start_worker`.


def _start_worker(examples, source_lang: str, target_lang: str, tokenizer, dtype) -> None:
  _worker.update(examples=examples, langs=(source_lang, target_lang), tokenizer=tokenizer, dtype=dtype)


def _tokenize_range(bounds: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
  """[(tokens, lengths) of the sources, (tokens, lengths) of the targets] of examples
  bounds[0] to bounds[1] - 1."""
  examples, tokenizer, dtype = _worker["examples"], _worker["tokenizer"], _worker["dtype"]
  chunk = sources.read_many(examples, range(*bounds))
  out = []
  for side, lang in zip(("src", "tgt"), _worker["langs"]):
    ids = tokenizer.encode_batch([ex[lang] for ex in chunk], target=side == "tgt")
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    out.append((np.fromiter((t for x in ids for t in x), dtype, int(lengths.sum())), lengths))
  return out


def corpus_cache_name(dataset: str, split: str, num_examples: int, tokenizer) -> str:
  """A file name that changes whenever the data or the tokenizer does."""
  digest = hashlib.sha256(tokenizer.fingerprint()).hexdigest()[:12]
  return f"{dataset}-{split}-{num_examples}-{digest}".replace("/", "_")
