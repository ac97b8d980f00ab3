"""A workdir on an object store (gs://): the tokenizer, the token caches, the metrics and the test
output go there through etils.epath, and each host memory-maps a local copy of the caches.

The bucket is fsspec's in-memory filesystem registered for gs://, where gcsfs would serve a real one
(etils.epath reaches both through fsspec)."""

import importlib
import os

import ml_collections
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from transformer_jax import experiment, paths
from transformer_jax.config import base_config
from transformer_jax.data import sources, token_cache
from transformer_jax.tokenizer import load_run_tokenizer

PAIRS = [(f"the {a} {b} is here", f"das {a} {b} ist hier") for a in ("red", "old", "big", "small", "new")
         for b in ("cat", "dog", "bird", "house")]


class FakeGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]


@pytest.fixture
def bucket(monkeypatch):
  """gs:// served from memory for this test; yields the objects written."""
  FakeGCS.store.clear()
  for name in ("gs", "gcs"):
    # fsspec's table of loaded filesystem classes (`fsspec.registry` is a read-only view of it).
    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, name, FakeGCS)
  FakeGCS.clear_instance_cache()
  yield FakeGCS.store
  FakeGCS.store.clear()


def text_run_config(tmp_path) -> ml_collections.ConfigDict:
  tsv = tmp_path / "train.tsv"
  tsv.write_text("".join(f"{en}\t{de}\n" for en, de in PAIRS * 3))
  config = base_config()
  config.data.update(dataset="text", text_train=str(tsv), data_dir=str(tmp_path / "tfds"),
                     local_cache_dir=str(tmp_path / "host_disk"), tokenize_processes=1)
  config.model.vocab_size = 40
  return config


def test_paths_keep_uris_and_make_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve("gs://bucket/run")) == "gs://bucket/run"
  assert os.fspath(paths.resolve("runs/x")) == str(tmp_path / "runs" / "x")
  assert os.fspath(paths.resolve("file:///tmp/x")) == "/tmp/x"
  assert paths.is_remote("s3://b/x") and not paths.is_remote("/tmp/x") and not paths.is_remote("file:///x")


def test_a_gs_workdir_holds_the_tokenizer_and_the_token_cache(tmp_path, bucket, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = text_run_config(tmp_path)
  raw = sources.load_split(config.data, "train")
  workdir = "gs://bucket/runs/toy"
  tokenizer = experiment.load_tokenizer(config, workdir, raw)
  split = experiment.load_split(config, workdir, "train", tokenizer)

  written = sorted(bucket)
  assert "gs://bucket/runs/toy/tokenizer.model" in written, written
  cache = [k for k in written if k.endswith("/" + token_cache.CACHE_MARKER)]
  assert len(cache) == 1 and all(any(k.endswith(f"/{a}.npy") for k in written) for a in token_cache.CORPUS_ARRAYS)
  assert not (tmp_path / "gs:").exists()  # os.path.abspath("gs://...") made such a local directory.
  # The arrays are mapped from this host's copy, not read from the bucket into memory.
  assert isinstance(split.corpus.src, np.memmap)
  assert split.corpus.src.filename.startswith(str(tmp_path / "host_disk"))
  assert tokenizer.decode(split.corpus.source(0)) == raw.examples[0]["en"].decode()

  # The same corpus as a local workdir gives; a second run reads the bucket's cache and tokenizer.
  local = experiment.load_split(config, tmp_path / "local_run", "train", tokenizer)
  again_tokenizer = load_run_tokenizer(workdir)
  assert again_tokenizer.model_proto == tokenizer.model_proto
  config.data.local_cache_dir = str(tmp_path / "other_host_disk")
  again = experiment.load_split(config, workdir, "train", again_tokenizer)
  for name in token_cache.CORPUS_ARRAYS:
    np.testing.assert_array_equal(getattr(again.corpus, name), getattr(local.corpus, name))
  assert sorted(bucket) == written  # Nothing tokenized or written again.


def test_an_unfinished_cache_is_tokenized_again(tmp_path, bucket):
  config = text_run_config(tmp_path)
  raw = sources.load_split(config.data, "train")
  tokenizer = experiment.load_tokenizer(config, "gs://bucket/run", raw)
  complete = experiment.load_split(config, "gs://bucket/run", "train", tokenizer)
  marker = next(k for k in bucket if k.endswith(token_cache.CACHE_MARKER))
  cache_dir = marker.rsplit("/", 1)[0]
  # A run killed while writing: one array truncated, no marker.
  del bucket[marker]
  bucket[cache_dir + "/tgt.npy"].seek(0)
  bucket[cache_dir + "/tgt.npy"].truncate(10)
  config.data.local_cache_dir = str(tmp_path / "fresh_disk")
  again = experiment.load_split(config, "gs://bucket/run", "train", tokenizer)
  np.testing.assert_array_equal(again.corpus.tgt, complete.corpus.tgt)
  assert marker in bucket


def test_metrics_and_test_output_on_an_object_store(bucket):
  log = paths.AppendLog("gs://bucket/run/metrics.jsonl")
  log.write('{"step": 1}\n')
  log.close()
  log = paths.AppendLog("gs://bucket/run/metrics.jsonl")  # A resumed run adds to what is there.
  log.write('{"step": 2}\n')
  assert paths.resolve("gs://bucket/run/metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
  paths.write_text_atomic("gs://bucket/run/test_metrics.json", "{}")
  assert sorted(k.rsplit("/", 1)[1] for k in bucket) == ["metrics.jsonl", "test_metrics.json"]
