"""The input pipeline: token budgets, padding, packing, resumption and per-process shards."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from transformer_jax import Transformer
from transformer_jax.constants import EOS_ID, PAD_ID
from transformer_jax.data import pipeline, token_cache
from transformer_jax.losses import label_smoothed_cross_entropy
from transformer_jax.tokenizer import train_tokenizer


def fake_corpus(n=600, max_len=40, vocab=40, seed=0) -> token_cache.TokenizedCorpus:
  """Correlated source and target lengths, like a real parallel corpus; EOS_ID ends each side."""
  rng = np.random.default_rng(seed)
  src_len = rng.integers(2, max_len, n)
  tgt_len = np.clip(src_len + rng.integers(-3, 4, n), 2, max_len + 5)
  def side(lengths):
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(4, vocab, offsets[-1]).astype(np.uint16)
    tokens[offsets[1:] - 1] = EOS_ID
    return tokens, offsets
  (s, so), (t, to) = side(src_len), side(tgt_len)
  return token_cache.TokenizedCorpus(s, so, t, to)


def epoch_batches(corpus, max_len=32, budget=512, **kwargs):
  indices, _ = pipeline.keep_indices(corpus, max_len)
  kwargs = {"packing": False, "seed": 0, "shuffle": True, "num_epochs": None, **kwargs}
  return pipeline.EpochBatches(corpus, indices, tokens_per_batch=budget, max_len=max_len, **kwargs)


def test_length_filter_counts_what_it_drops():
  corpus = fake_corpus()
  kept, dropped = pipeline.keep_indices(corpus, 32)
  too_long = (corpus.src_lengths > 32) | (corpus.tgt_lengths > 32)
  assert dropped == too_long.sum() > 0 and len(kept) + dropped == len(corpus)
  assert np.all(corpus.src_lengths[kept] <= 32) and np.all(corpus.tgt_lengths[kept] <= 32)


@pytest.mark.parametrize("packing", [False, True])
def test_batches_respect_the_token_budget_and_report_padding(packing):
  corpus = fake_corpus()
  batches = epoch_batches(corpus, packing=packing, multiple_of=2)
  fractions = []
  for k in range(len(batches.plan(0))):
    batch = batches[k]
    assert batch["src"].size <= 512 and batch["tgt"].size <= 512
    assert batch["src"].shape[0] % 2 == 0 and batch["src"].dtype == np.int32
    fractions.append(pipeline.padding_fraction(batch))
  print(f"packing={packing}: padding {np.mean(fractions):.1%} of token slots")
  assert 0 < np.mean(fractions) < (0.2 if packing else 0.5)


@pytest.mark.parametrize("packing", [False, True])
def test_evaluation_sees_every_example_exactly_once(packing):
  corpus = fake_corpus()
  indices, _ = pipeline.keep_indices(corpus, 32)
  batches = pipeline.EpochBatches.single_pass(corpus, indices, tokens_per_batch=512, max_len=32,
                                              packing=packing, multiple_of=2)
  seen = [i for k in range(len(batches)) for row in batches.plan(0).rows[k] for i in row]
  assert sorted(seen) == sorted(indices.tolist())
  if packing:  # Every example is one segment of a row; every batch has the same shape.
    examples = sum(int(batches[k]["tgt_segments"].max(axis=1).sum()) for k in range(len(batches)))
    assert {batches[k]["src"].shape for k in range(len(batches))} == {(16, 32)}
  else:
    examples = sum(int(np.any(batches[k]["src"] != PAD_ID, axis=1).sum()) for k in range(len(batches)))
  assert examples == len(indices)
  target_tokens = sum(int((batches[k]["tgt"] != PAD_ID).sum()) for k in range(len(batches)))
  assert target_tokens == corpus.tgt_lengths[indices].sum()
  with pytest.raises(IndexError):
    batches[len(batches)]


def test_the_loss_over_packed_evaluation_batches_equals_the_bucketed_loss():
  """Validation packs its rows when training does; the loss, accuracy and token count must not
  depend on it, and the packed pass must have one batch shape (one program to compile)."""
  from tiny_run import fake_corpus as reversal_corpus, tiny_setup
  from transformer_jax.evaluate import evaluate_loss
  config, setup = tiny_setup(jax.devices()[:1])
  params = setup.init_state(0).params
  corpus = reversal_corpus()
  indices, _ = pipeline.keep_indices(corpus, 32)
  metrics, shapes = {}, {}
  for packing in (False, True):
    batches = pipeline.EpochBatches.single_pass(corpus, indices, tokens_per_batch=256, max_len=32,
                                                packing=packing)
    shapes[packing] = {batches[k]["tgt"].shape for k in range(len(batches))}
    metrics[packing] = evaluate_loss(setup, params, (batches[k] for k in range(len(batches))))
  assert len(shapes[True]) == 1 < len(shapes[False])
  assert metrics[True]["tokens"] == metrics[False]["tokens"] == corpus.tgt_lengths[indices].sum()
  for key in ("loss", "accuracy", "perplexity"):
    np.testing.assert_allclose(metrics[True][key], metrics[False][key], rtol=1e-5, err_msg=key)


def test_two_processes_get_disjoint_shards_that_cover_the_data():
  corpus = fake_corpus()
  indices, _ = pipeline.keep_indices(corpus, 32)
  shards = [epoch_batches(corpus, multiple_of=4, process_index=p, process_count=2) for p in (0, 1)]
  whole = epoch_batches(corpus, multiple_of=4)
  for k in range(len(whole.plan(0))):
    parts = [shard[k] for shard in shards]
    assert parts[0]["src"].shape[0] == parts[1]["src"].shape[0] == whole[k]["src"].shape[0] // 2
    np.testing.assert_array_equal(np.concatenate([p["src"] for p in parts]), whole[k]["src"])
  rows = whole.plan(0).rows
  assert sorted(i for batch in rows for row in batch for i in row) == sorted(indices.tolist())


def test_epochs_are_reshuffled_and_deterministic():
  batches = epoch_batches(fake_corpus())
  assert batches.plan(0).rows != batches.plan(1).rows
  assert epoch_batches(fake_corpus()).plan(1).rows == batches.plan(1).rows
  first_of_epoch_1 = len(batches.plan(0))
  assert batches[first_of_epoch_1]["epoch"] == 1


@pytest.mark.parametrize("packing", [False, True])
def test_restoring_the_iterator_state_reproduces_the_next_batches(packing):
  dataset = pipeline.make_dataset(epoch_batches(fake_corpus(), packing=packing))
  iterator = iter(dataset)
  for _ in range(7):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(30)]  # Crosses into the next epoch.
  resumed = iter(pipeline.make_dataset(epoch_batches(fake_corpus(), packing=packing)))
  resumed.set_state(state)
  for want, got in zip(expected, (next(resumed) for _ in range(30))):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def test_packed_batch_loss_equals_the_unpacked_loss_per_example():
  corpus = fake_corpus(n=40, max_len=12)
  packed = epoch_batches(corpus, max_len=24, budget=96, packing=True, shuffle=False, num_epochs=1)
  config = tiny_config(dropout_rate=0.0)
  model = Transformer(config)
  batch = packed[0]
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.asarray(batch["src"]), jnp.asarray(batch["tgt"])))["params"]
  forward = jax.jit(lambda p, b: label_smoothed_cross_entropy(model.apply(
      {"params": p}, b["src"], b["tgt"], **{k: b.get(k) for k in (
          "src_segments", "src_positions", "tgt_segments", "tgt_positions")}), b["tgt"], 0.1))

  losses = np.asarray(forward(params, {k: jnp.asarray(v) for k, v in batch.items() if k != "epoch"}))
  rows = packed.plan(0).rows[0]
  assert max(len(row) for row in rows) > 1, "the batch should pack several examples in a row"
  checked = 0
  for r, row in enumerate(rows):
    for segment, i in enumerate(row, start=1):
      in_segment = batch["tgt_segments"][r] == segment
      packed_loss = losses[r][in_segment].sum()
      src, tgt = corpus.source(i)[None].astype(np.int32), corpus.target(i)[None].astype(np.int32)
      alone = forward(params, {"src": jnp.asarray(src), "tgt": jnp.asarray(tgt)})
      np.testing.assert_allclose(packed_loss, float(alone.sum()), rtol=1e-4)
      checked += 1
  assert checked >= 4


def test_tokenize_corpus_round_trips_and_caches(tmp_path):
  text = [{"en": f"the word {w} is here".encode(), "de": f"das Wort {w} ist hier".encode()}
          for w in ["alpha", "beta", "gamma", "delta", "epsilon"] * 20]
  tokenizer = train_tokenizer((s for ex in text for s in ex.values()), vocab_size=60)
  cache = tmp_path / token_cache.corpus_cache_name("toy", "train", len(text), tokenizer)
  corpus = token_cache.tokenize_corpus(text, "en", "de", tokenizer, cache_path=str(cache), chunk_size=7)
  assert cache.exists() and len(corpus) == len(text)
  for i in (0, 13, 99):
    assert tokenizer.decode(corpus.source(i)) == text[i]["en"].decode()
    assert tokenizer.decode(corpus.target(i)) == text[i]["de"].decode()
  again = token_cache.tokenize_corpus([], "en", "de", tokenizer, cache_path=str(cache))
  np.testing.assert_array_equal(again.tgt, corpus.tgt)
  # Memory-mapped from the cache's .npy files, not read into memory.
  assert all(isinstance(getattr(again, k), np.memmap) for k in token_cache.CORPUS_ARRAYS)
  assert not again.src.flags.writeable
  import pickle
  shipped = pickle.dumps(again)  # As grain sends it to a worker process: file names, not tokens.
  assert len(shipped) < 1000 < again.src.nbytes + again.src_offsets.nbytes
  np.testing.assert_array_equal(pickle.loads(shipped).src, corpus.src)


def test_tokenizing_in_several_processes_gives_the_same_arrays(tmp_path):
  text = [{"en": f"sentence {i} with {w}".encode(), "de": f"Satz {i} mit {w}".encode()}
          for i, w in enumerate(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"] * 9)]
  tokenizer = train_tokenizer((s for ex in text for s in ex.values()), vocab_size=60)
  serial = token_cache.tokenize_corpus(text, "en", "de", tokenizer, chunk_size=5)
  parallel = token_cache.tokenize_corpus(text, "en", "de", tokenizer, chunk_size=3, processes=2,
                                      cache_path=tmp_path / "cache")
  for name in token_cache.CORPUS_ARRAYS:
    np.testing.assert_array_equal(getattr(parallel, name), getattr(serial, name))
  assert token_cache.is_corpus_cache(tmp_path / "cache")
  assert tokenizer.decode(parallel.target(62)) == text[62]["de"].decode()


def test_batches_from_the_mapped_cache_equal_batches_from_arrays_in_memory(tmp_path):
  import tiny_run
  corpus = tiny_run.fake_corpus()
  cache = tmp_path / "cache"
  (tmp_path / "cache.tmp").mkdir()
  for name in token_cache.CORPUS_ARRAYS:
    np.save(tmp_path / "cache.tmp" / f"{name}.npy", getattr(corpus, name))
  (tmp_path / "cache.tmp").rename(cache)
  mapped = token_cache.load_corpus_cache(str(cache))
  indices, _ = pipeline.keep_indices(corpus, 32)
  for packing in (False, True):
    make = lambda c: pipeline.EpochBatches(c, indices, tokens_per_batch=256, max_len=32, packing=packing,
                                           seed=3, shuffle=True, num_epochs=None, multiple_of=2)
    in_memory, from_disk = make(corpus), make(mapped)
    for k in (0, 5, len(in_memory.plan(0)) + 2):  # Into the second epoch too.
      a, b = in_memory[k], from_disk[k]
      assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("seed", [None, 0, 1, 7])
def test_the_array_plan_makes_the_batches_the_list_plan_made(seed):
  corpus = fake_corpus(n=2000, seed=3)
  indices, _ = pipeline.keep_indices(corpus, 32)
  rng = lambda: None if seed is None else np.random.default_rng([seed, 0])
  plan = pipeline.plan_bucketed(corpus, indices, 256, 32, 4, rng())
  # The pipeline's first, list-based plan (kept in bench/plan_scale.py): the same batches, so runs
  # resume onto the same data.
  from bench.plan_scale import list_plan
  rows, lengths, sizes = list_plan(corpus, indices, 256, 32, 4, rng())
  assert plan.rows == rows and plan.lengths.tolist() == lengths and plan.sizes.tolist() == sizes
