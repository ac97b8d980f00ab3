"""Greedy and beam search (section 6.1): fake models checked by enumeration and by hand, and the
Transformer decoded with and without its cache, one example at a time, under jit and sharded."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from conftest import init_params, random_tokens, tiny_config
from reference_decode import greedy_search_uncached, uncached_decoder
from transformer_jax import BOS_ID, EOS_ID, PAD_ID, Transformer
from transformer_jax.decode import (
    CacheGrowth, beam_search, doubling_lengths, expand_to_beams, greedy_search, length_penalty)
from transformer_jax import decode, translation
from transformer_jax.translation import cached_decoder, grow_self_cache, make_translate_fn, translate
from transformer_jax.topk import blockwise_top_k, per_device_top_k

# Fake models over a vocabulary of 5 ids. They give PAD_ID and BOS_ID probability 0, so outputs are
# made of the words 3 and 4 and EOS_ID; the impossible ids also check that -inf log-probabilities
# pass through the search.
V = 5
WORDS = (3, 4)
IMPOSSIBLE = (PAD_ID, BOS_ID)


def hashing_model(seed: int, num_states: int = 101):
  """A fake model whose next-token distribution depends on the whole prefix, through the cache.

  The cache holds a hash of the prefix (one int per row), so reordering beams without reordering
  the cache, or mixing rows up, changes the log-probabilities. Rows start from different hashes,
  so the examples of a batch see different distributions.
  """
  logits = 2.0 * jax.random.normal(jax.random.key(seed), (num_states, V))
  logits = logits.at[:, IMPOSSIBLE].set(-jnp.inf)

  def tokens_to_logits(tokens, cache, index):
    del index
    state = (cache["state"] * 31 + tokens[:, 0] + 1) % num_states
    return logits[state], {"state": state}

  def initial_cache(batch_size):
    return {"state": jnp.arange(batch_size, dtype=jnp.int32) * 17}

  return tokens_to_logits, initial_cache


def step_model(probs, calls=None):
  """A fake model whose next-token probabilities depend only on the step: probs[index] [V].

  If `calls` is a list, every step appends its index to it (the number of steps the loop ran).
  """
  logprobs = jnp.log(jnp.asarray(probs, jnp.float32))

  def tokens_to_logits(tokens, cache, index):
    if calls is not None:
      jax.debug.callback(lambda i: calls.append(int(i)), index)
    return jnp.broadcast_to(logprobs[index], (tokens.shape[0], V)), cache

  return tokens_to_logits


def probs_row(eos, word3, word4=0.0):
  row = np.zeros(V)
  row[EOS_ID], row[3], row[4] = eos, word3, word4
  return row


def enumerate_hypotheses(tokens_to_logits, cache, max_len, alpha):
  """Every output of one example by brute force: (score, tokens) lists of the finished outputs
  (ending in EOS_ID, at most max_len tokens) and of the unfinished ones (max_len tokens, no EOS_ID),
  scored log P / ((5 + |Y|) / 6) ** alpha with |Y| the number of tokens, EOS_ID included."""
  finished, unfinished = [], []

  def walk(prefix, logprob, cache):
    last = BOS_ID if not prefix else prefix[-1]
    logits, cache = tokens_to_logits(jnp.array([[last]], jnp.int32), cache, jnp.int32(len(prefix)))
    logprobs = np.asarray(jax.nn.log_softmax(logits[0]), np.float64)
    for token in range(V):
      if logprobs[token] == -np.inf:
        continue
      seq, total = prefix + [token], logprob + logprobs[token]
      penalty = ((5 + len(seq)) / 6) ** alpha
      if token == EOS_ID:
        finished.append((total / penalty, seq))
      elif len(seq) == max_len:
        unfinished.append((total / penalty, seq))
      else:
        walk(seq, total, cache)

  walk([], 0.0, cache)
  return sorted(finished, reverse=True), sorted(unfinished, reverse=True)


def padded(seq, max_len):
  return seq + [PAD_ID] * (max_len - len(seq))


def check_against_enumeration(sequences, scores, expected, max_len):
  """The beam's hypotheses are the enumeration's best, in order; slots beyond them are -inf."""
  sequences, scores = np.asarray(sequences), np.asarray(scores)
  k = min(len(expected), len(scores))
  np.testing.assert_allclose(scores[:k], [s for s, _ in expected[:k]], rtol=1e-5)
  np.testing.assert_array_equal(sequences[:k], [padded(seq, max_len) for _, seq in expected[:k]])
  assert np.all(scores[k:] == -np.inf)


# The search on fake models.


def test_length_penalty_is_gnmt():
  np.testing.assert_allclose(length_penalty(jnp.arange(1, 4), 0.6),
                             [(6 / 6) ** 0.6, (7 / 6) ** 0.6, (8 / 6) ** 0.6], rtol=1e-6)
  np.testing.assert_allclose(length_penalty(7, 0.0), 1.0)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0, 5.0])
def test_scores_and_eos_handling_by_hand(alpha):
  """Three steps: P(EOS) = 0.2, then 0.6 after word 3, then 0.9 after 3 3 (and 0.1 for 3 3 3).

  Beam 2 keeps every extension, so the finished hypotheses are EOS (|Y| = 1), 3 EOS (|Y| = 2)
  and 3 3 EOS (|Y| = 3); the best two are returned, padded after EOS. Up to alpha = 2, 3 EOS
  ranks first; at alpha = 5 the penalty puts the longer 3 3 EOS ahead of it."""
  probs = [probs_row(0.2, 0.8), probs_row(0.6, 0.4), probs_row(0.9, 0.1)]
  tokens_to_logits = step_model(probs)
  sequences, scores = beam_search(tokens_to_logits, {}, batch_size=1, beam_size=2, max_len=3,
                                  alpha=alpha)
  lp = lambda n: ((5 + n) / 6) ** alpha
  by_hand = {
      (EOS_ID, PAD_ID, PAD_ID): math.log(0.2) / lp(1),
      (3, EOS_ID, PAD_ID): (math.log(0.8) + math.log(0.6)) / lp(2),
      (3, 3, EOS_ID): (math.log(0.8) + math.log(0.4) + math.log(0.9)) / lp(3),
  }
  best = sorted(by_hand.items(), key=lambda kv: -kv[1])[:2]
  np.testing.assert_array_equal(sequences[0], [seq for seq, _ in best])
  np.testing.assert_allclose(scores[0], [score for _, score in best], rtol=1e-6)


@pytest.mark.parametrize("alpha,expected_steps", [(0.0, 1), (0.6, 2)])
def test_early_stop_uses_the_best_possible_length_penalty(alpha, expected_steps):
  """Beam 1, P(EOS) = 0.55 at the first step: EOS finishes with score log 0.55 = -0.598; word 3
  stays alive at log 0.45 = -0.799.

  alpha = 0: -0.799 <= -0.598, so no extension can win; the search stops after one step.
  alpha = 0.6: the alive hypothesis could reach -0.799 / lp(10) = -0.461 at the longest length,
  which beats -0.598, so the search goes on (even though -0.799 / lp(2) = -0.728 would not). At
  step 2 word 3 (0.6) outranks EOS (0.4); -1.31 / lp(10) = -0.756 cannot win, and it stops."""
  probs = [probs_row(0.55, 0.45)] + [probs_row(0.4, 0.6)] * 9
  calls = []
  sequences, scores = beam_search(step_model(probs, calls), {}, batch_size=1, beam_size=1,
                                   max_len=10, alpha=alpha)
  jax.effects_barrier()
  assert len(calls) == expected_steps
  np.testing.assert_array_equal(sequences[0, 0], padded([EOS_ID], 10))
  np.testing.assert_allclose(scores[0, 0], math.log(0.55), rtol=1e-6)


def test_greedy_pads_after_eos_and_stops_when_every_row_has_ended():
  probs = [probs_row(0.1, 0.9)] * 2 + [probs_row(0.9, 0.1)] + [probs_row(0.1, 0.9)] * 7
  calls = []
  tokens = greedy_search(step_model(probs, calls), {}, batch_size=2, max_len=10)
  jax.effects_barrier()
  assert len(calls) == 3
  np.testing.assert_array_equal(tokens, [padded([3, 3, EOS_ID], 10)] * 2)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_wide_beam_finds_the_enumerated_best(alpha, seed):
  """With a beam as wide as the number of hypotheses of the longest length (2^(L-1) alive
  prefixes times 3 extensions), nothing is pruned: the beam returns the best finished outputs
  exactly, for each example of the batch."""
  max_len, batch_size = 5, 3
  beam_size = len(WORDS) ** (max_len - 1) * (len(WORDS) + 1)
  tokens_to_logits, initial_cache = hashing_model(seed)
  sequences, scores = jax.jit(lambda cache: beam_search(
      tokens_to_logits, cache, batch_size, beam_size, max_len, alpha))(initial_cache(batch_size))
  assert sequences.shape == (batch_size, beam_size, max_len)
  assert scores.shape == (batch_size, beam_size)
  for b in range(batch_size):
    cache = jax.tree.map(lambda x: x[b:b + 1], initial_cache(batch_size))
    finished, _ = enumerate_hypotheses(tokens_to_logits, cache, max_len, alpha)
    assert len(finished) == sum(len(WORDS) ** n for n in range(max_len))
    check_against_enumeration(sequences[b], scores[b], finished, max_len)


@pytest.mark.parametrize("beam_size", [1, 2, 4])
def test_narrow_beam_scores_are_the_scores_of_its_sequences(beam_size):
  """A narrow beam may miss the best output, but every score it returns is its sequence's
  length-penalised log-probability, descending, and the best is no better than the enumeration's.
  With beam 1, some examples here finish nothing and fall back to their alive hypothesis."""
  max_len, batch_size, alpha = 6, 4, 0.6
  tokens_to_logits, initial_cache = hashing_model(seed=3)
  sequences, scores = beam_search(tokens_to_logits, initial_cache(batch_size), batch_size,
                                  beam_size, max_len, alpha)
  for b in range(batch_size):
    cache = jax.tree.map(lambda x: x[b:b + 1], initial_cache(batch_size))
    finished, unfinished = enumerate_hypotheses(tokens_to_logits, cache, max_len, alpha)
    # Unfinished outputs come back only when the beam finished none (scored with |Y| = max_len).
    score_of = {tuple(padded(seq, max_len)): score for score, seq in finished + unfinished}
    assert np.all(np.diff(np.asarray(scores[b])) <= 0)
    for seq, score in zip(np.asarray(sequences[b]), np.asarray(scores[b])):
      if score > -np.inf:
        np.testing.assert_allclose(score, score_of[tuple(seq)], rtol=1e-5)
    if EOS_ID in np.asarray(sequences[b, 0]):
      assert scores[b, 0] <= finished[0][0] + 1e-5
    else:
      assert not np.any(np.asarray(sequences[b]) == EOS_ID)


def test_without_any_finished_hypothesis_the_alive_ones_are_returned():
  """A model that never emits EOS: the beam returns the best max_len-token outputs, scored with
  |Y| = max_len. A beam of 2^(L-1) keeps every prefix, so they are the enumeration's best."""
  max_len, alpha = 4, 0.6
  probs = np.random.default_rng(0).uniform(0.1, 1.0, (max_len, V))
  probs[:, [PAD_ID, BOS_ID, EOS_ID]] = 0.0
  # The step model's distribution does not depend on the prefix; add a term that depends on the
  # token before the last, carried by the cache, so the ranking is not a product of independent
  # steps and the cache must follow its beam.
  bonus = jnp.asarray(np.random.default_rng(1).normal(size=(V, V)), jnp.float32)
  step = step_model(probs / probs.sum(-1, keepdims=True))

  def tokens_to_logits(tokens, cache, index):
    logits, _ = step(tokens, cache, index)
    return logits + bonus[cache["last"]], {"last": tokens[:, 0]}

  cache = {"last": jnp.full((1,), BOS_ID, jnp.int32)}
  beam_size = len(WORDS) ** (max_len - 1)
  sequences, scores = beam_search(tokens_to_logits, cache, 1, beam_size, max_len, alpha)
  _, unfinished = enumerate_hypotheses(tokens_to_logits, cache, max_len, alpha)
  assert len(unfinished) == len(WORDS) ** max_len
  check_against_enumeration(sequences[0], scores[0], unfinished, max_len)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_of_one_without_length_penalty_is_greedy_on_a_fake_model(seed):
  tokens_to_logits, initial_cache = hashing_model(seed)
  greedy = greedy_search(tokens_to_logits, initial_cache(8), 8, 12)
  sequences, _ = beam_search(tokens_to_logits, initial_cache(8), 8, 1, 12, alpha=0.0)
  np.testing.assert_array_equal(sequences[:, 0], greedy)


def test_expand_to_beams_repeats_each_row_in_place():
  tree = {"a": jnp.arange(3), "b": jnp.arange(6).reshape(3, 2)}
  expanded = expand_to_beams(tree, 2)
  np.testing.assert_array_equal(expanded["a"], [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(expanded["b"][2:4], [[2, 3], [2, 3]])


def test_bad_arguments_are_refused():
  tokens_to_logits, initial_cache = hashing_model(0)
  with pytest.raises(ValueError, match="alpha"):
    beam_search(tokens_to_logits, initial_cache(1), 1, 2, 4, alpha=-0.5)
  with pytest.raises(ValueError, match="beam_size"):
    beam_search(tokens_to_logits, initial_cache(1), 1, 0, 4)
  with pytest.raises(ValueError, match="max_len"):
    greedy_search(tokens_to_logits, initial_cache(1), 1, 0)


# The Transformer.

S = 7  # Padded source length.
EXTRA = 10  # Output positions beyond the source length; the paper uses 50.
# The self-attention cache starts with 3 positions and grows to 6, 12, then 17 (S + EXTRA): the
# tests that compare `translate_fn` with other decoders check the growing cache too.
FIRST_CACHE_LEN = 3


@functools.cache
def model_and_sources(batch_size=8, seed=0, **overrides):
  """A random tiny Transformer and sources ending in EOS_ID, of several lengths.

  The EOS_ID embedding row is scaled up: an untrained model seldom predicts EOS_ID, and the tests
  should see outputs that end as well as outputs that run to the maximum length. Cached across
  tests (initialising takes a while); callers must not modify what it returns."""
  config = tiny_config(**overrides)
  src = random_tokens(jax.random.key(seed), (batch_size, S), config.vocab_size)
  lengths = jnp.arange(batch_size) % (S - 2) + 3
  positions = jnp.arange(S)[None, :]
  src = jnp.where(positions < lengths[:, None] - 1, src, PAD_ID)
  src = jnp.where(positions == lengths[:, None] - 1, EOS_ID, src)
  params = init_params(config, src, src, seed=seed)
  params["embed"]["embedding"] = params["embed"]["embedding"].at[EOS_ID].multiply(1.5)
  return Transformer(config), params, src


@functools.cache
def translate_fn(beam_size):
  """The compiled translate of the default model, shared by the tests (one compile per shape)."""
  model, _, _ = model_and_sources()
  return make_translate_fn(model, beam_size=beam_size, alpha=0.6, max_extra_len=EXTRA,
                           first_cache_len=FIRST_CACHE_LEN)


def test_cached_greedy_equals_uncached_greedy():
  model, params, src = model_and_sources()
  max_len = S + EXTRA
  cached = translate_fn(1)(params, src)
  uncached = jax.jit(greedy_search_uncached, static_argnums=(0, 3))(model, params, src, max_len)
  assert cached.shape == (src.shape[0], max_len)
  np.testing.assert_array_equal(cached, uncached)


@pytest.mark.parametrize("follow", ["rows", "in place"])
def test_cached_beam_search_equals_uncached_beam_search(follow):
  """Whether the search gathers the whole cache after every step (`decode.ROWS`) or the decoder
  keeps each beam's keys where they were written (`translation.IN_PLACE`)."""
  model, params, src = model_and_sources()
  max_len, beam_size = S + EXTRA, 3
  cache_follows = {"rows": decode.ROWS, "in place": translation.IN_PLACE}[follow]

  @jax.jit
  def search(params, src):
    encoded = model.apply({"params": params}, src, method=Transformer.encode)
    tokens_to_logits, cache = cached_decoder(model, params, encoded, src, max_len)
    return [beam_search(tokens_to_logits, cache, src.shape[0], beam_size, max_len, 0.6,
                        follow=cache_follows),
            beam_search(*uncached_decoder(model, params, encoded, src, max_len), src.shape[0],
                        beam_size, max_len, 0.6)]

  (cached_seqs, cached_scores), (uncached_seqs, uncached_scores) = search(params, src)
  np.testing.assert_array_equal(cached_seqs, uncached_seqs)
  np.testing.assert_allclose(cached_scores, uncached_scores, rtol=1e-4)


def test_beam_of_one_without_length_penalty_is_greedy_on_the_transformer():
  model, params, src = model_and_sources()
  max_len = S + EXTRA

  @jax.jit
  def search(params, src):
    encoded = model.apply({"params": params}, src, method=Transformer.encode)
    tokens_to_logits, cache = cached_decoder(model, params, encoded, src, max_len)
    greedy = greedy_search(tokens_to_logits, cache, src.shape[0], max_len)
    sequences, _ = beam_search(tokens_to_logits, cache, src.shape[0], 1, max_len, alpha=0.0)
    return greedy, sequences[:, 0]

  greedy, beam = search(params, src)
  np.testing.assert_array_equal(beam, greedy)
  # translate takes the greedy path for a beam of one, whatever alpha.
  np.testing.assert_array_equal(translate_fn(1)(params, src), greedy)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_a_growing_cache_decodes_as_a_full_one(beam_size):
  """Growing the cache in stages (3, 6, 12, 17 positions) changes no token: a stage boundary
  placed wrong would write past the cache (clamped by dynamic_update_slice) or lose positions."""
  model, params, src = model_and_sources()
  assert doubling_lengths(S + EXTRA, FIRST_CACHE_LEN) == (3, 6, 12, 17)
  full = make_translate_fn(model, beam_size, 0.6, EXTRA, first_cache_len=S + EXTRA)(params, src)
  grown = translate_fn(beam_size)(params, src)
  np.testing.assert_array_equal(grown, full)
  # Some outputs run past the first stages, so the test crosses every boundary.
  lengths = np.sum(np.cumprod(np.asarray(full) != EOS_ID, axis=1), axis=1)
  assert lengths.max() >= 12, lengths


def test_cache_growth_lengths_are_checked():
  assert doubling_lengths(10, 16) == (10,)
  assert doubling_lengths(113, 32) == (32, 64, 113)
  assert doubling_lengths(64, 32) == (32, 64)
  with pytest.raises(ValueError, match="first"):
    doubling_lengths(10, 0)
  model, params, src = model_and_sources()
  encoded = model.apply({"params": params}, src, method=Transformer.encode)
  tokens_to_logits, cache = cached_decoder(model, params, encoded, src, 4)
  for lengths in [(4, 8), (4, 20, 17), (8, 4, 17)]:
    with pytest.raises(ValueError, match="must increase to max_len=17"):
      greedy_search(tokens_to_logits, cache, src.shape[0], 17, CacheGrowth(lengths, grow_self_cache))


@pytest.mark.parametrize("n", [37, 64, 100, 256, 1000])
def test_blockwise_top_k_is_top_k_ties_included(n):
  """Values from a few levels, so that most are tied, some -inf, and rows that are all -inf:
  the same values and indices as lax.top_k (ties to the lower index), whatever n and block."""
  rng = np.random.default_rng(n)
  x = rng.integers(0, 6, (16, n)).astype(np.float32)
  x[rng.random(x.shape) < 0.3] = -np.inf
  x[3] = -np.inf
  x[5, -1] = 9.0  # A best value in the last, partial block.
  for k, block in [(1, 4), (5, 4), (8, 16), (8, 64), (3, 7)]:
    got = blockwise_top_k(jnp.asarray(x), k, block)
    want = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("beam_size", [1, 4])
def test_examples_of_a_batch_decode_independently(beam_size):
  """Each example decoded alone (with the same padded source length, hence the same maximum
  output length) gives what it gets in the batch."""
  _, params, src = model_and_sources()
  together = translate_fn(beam_size)(params, src)
  for b in range(src.shape[0]):
    np.testing.assert_array_equal(together[b:b + 1], translate_fn(beam_size)(params, src[b:b + 1]),
                                  err_msg=f"example {b}")


def test_learned_positions_limit_the_output_length():
  model, params, src = model_and_sources(positional_encoding="learned", max_len=32)
  with pytest.raises(ValueError, match="learned positions"):
    translate(model, params, src, beam_size=2, alpha=0.6, max_extra_len=50)
  out = jax.eval_shape(lambda p, s: translate(model, p, s, beam_size=2, alpha=0.6,
                                              max_extra_len=32 - S), params, src)
  assert out.shape == (src.shape[0], 32)


def data_mesh():
  """The 8 fake CPU devices of conftest on one "data" axis. Auto axes, as in `sharding.make_mesh`:
  XLA propagates the batch sharding through the search. (With the default explicit axes the
  model's embedding lookup asks for an output sharding.)"""
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize("beam_size", [1, 4])
def test_jitted_translate_on_a_sharded_batch_equals_unsharded(beam_size):
  """The batch split over the mesh, the parameters replicated: the same tokens as on one device,
  and the output stays split over the batch."""
  _, params, src = model_and_sources()
  assert src.shape[0] == 8
  expected = translate_fn(beam_size)(params, src)
  mesh = data_mesh()
  sharded_src = jax.device_put(src, NamedSharding(mesh, P("data")))
  replicated = jax.device_put(params, NamedSharding(mesh, P()))
  out = translate_fn(beam_size)(replicated, sharded_src)
  np.testing.assert_array_equal(out, expected)
  assert len(out.sharding.device_set) == 8


def test_search_on_a_sharded_fake_cache_equals_unsharded():
  tokens_to_logits, initial_cache = hashing_model(0)
  cache = initial_cache(8)
  sharded = jax.device_put(cache, NamedSharding(data_mesh(), P("data")))
  search = jax.jit(lambda cache: (greedy_search(tokens_to_logits, cache, 8, 6),
                                  beam_search(tokens_to_logits, cache, 8, 3, 6, 0.6)))
  for got, want in zip(jax.tree.leaves(search(sharded)), jax.tree.leaves(search(cache))):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_translations_never_contain_padding_or_the_start_symbol(beam_size):
  # A model that prefers PAD_ID and BOS_ID to everything: decoding must still pick other ids.
  config = tiny_config(dropout_rate=0.0, logits_bias=True)
  src = random_tokens(jax.random.key(0), (3, 6), config.vocab_size)
  params = init_params(config, src, src)
  params["decoder"]["logits_bias"] = params["decoder"]["logits_bias"].at[jnp.array([PAD_ID, BOS_ID])].set(50.0)
  out = np.asarray(translate(Transformer(config), params, src, beam_size=beam_size, alpha=0.6,
                             max_extra_len=4))
  for row in out:
    ended = np.flatnonzero(row == EOS_ID)
    generated = row[:ended[0]] if len(ended) else row
    assert not np.isin(generated, [PAD_ID, BOS_ID]).any(), row


def test_beam_search_on_a_mesh_searches_each_devices_rows_without_gathering_the_batch():
  import flax.linen as nn
  import tiny_run
  from transformer_jax import sharding, steps, translation
  config, _ = tiny_run.tiny_setup()
  setup = steps.make_setup(config, jax.devices()[:8])
  src = jax.ShapeDtypeStruct((16, 12), jnp.int32, sharding=sharding.batch_sharding(setup.mesh))
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    jitted = translation.translator(setup.model, setup.mesh, setup.rules).jit_fn(4, 0.6, 6)
    hlo = jitted.trace(setup.abstract_state().params, src).lower().compile().as_text()
  assert "TopK" in hlo or "top_k" in hlo.lower() or "sort" in hlo
  # Only the loop's "is any hypothesis alive" test crosses devices: no all-gather of scores.
  assert "all-gather" not in hlo


def test_blockwise_top_k_on_a_mesh_runs_on_each_devices_rows():
  """Rows long enough for the blockwise path, split over 8 devices by the logical rules: the same
  values and indices as lax.top_k, and no all-gather in the program."""
  import flax.linen as nn
  mesh = data_mesh()
  x = jax.random.randint(jax.random.key(0), (16, 1000), 0, 50).astype(jnp.float32)
  sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh), nn.logical_axis_rules((("batch", "data"),)):
    search = jax.jit(lambda x: per_device_top_k(x, 8))
    values, indices = search(sharded)
    hlo = search.lower(sharded).compile().as_text()
  want = jax.lax.top_k(x, 8)
  np.testing.assert_array_equal(values, want[0])
  np.testing.assert_array_equal(indices, want[1])
  assert "all-gather" not in hlo


def early_ending_batch():
  """16 sources whose translations end at different steps, most of them early: the EOS_ID row is
  scaled further (to 2.2 times its random size) so that more than half of the batch finishes
  before the last cache stage, with beam 1 and beam 4."""
  model, params, src = model_and_sources(batch_size=16, seed=0)
  params = jax.tree.map(lambda x: x, params)  # A new dict: the cached one stays as it is.
  params["embed"]["embedding"] = params["embed"]["embedding"].at[EOS_ID].multiply(2.2 / 1.5)
  return model, params, src


@pytest.mark.parametrize("beam_size", [1, 4])
def test_dropping_finished_examples_changes_no_translation(beam_size):
  """The compacting decoder (finished examples leave the batch between its loops) gives
  `translate`'s tokens, and it did shrink the batch."""
  model, params, src = early_ending_batch()
  decoder = translation.CompactingDecoder(model, beam_size, 0.6, EXTRA, first_cache_len=FIRST_CACHE_LEN)
  got = decoder(params, src)
  want = np.asarray(make_translate_fn(model, beam_size, 0.6, EXTRA, first_cache_len=FIRST_CACHE_LEN)(
      params, src))
  np.testing.assert_array_equal(got, want)
  sizes = [rows for rows, _, steps in decoder.loops if steps]
  assert sizes[0] == 16 and min(sizes) < 16, decoder.loops
  assert sum(steps for _, _, steps in decoder.loops) <= S + EXTRA
  # Every cache length it used is one of translate's stages, in order.
  assert [length for _, length, _ in decoder.loops] == sorted(length for _, length, _ in decoder.loops)


def test_the_compacting_decoder_keeps_batches_split_over_devices_whole():
  """On a mesh that splits the batch over 2 devices, it never cuts a batch to an odd size, and it
  still translates as `translate` does."""
  import flax.linen as nn
  from transformer_jax import sharding
  model, params, src = early_ending_batch()
  mesh = jax.make_mesh((2, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:2],
                       axis_types=(AxisType.Auto,) * 3)
  placed = jax.device_put(src, sharding.batch_sharding(mesh))
  translator = translation.Translator(model, mesh, (("batch", sharding.BATCH_AXES),))
  got = translator.fn(4, 0.6, EXTRA, compact=True)(params, placed)
  decoder = translator._compacting[(4, 0.6, EXTRA)]
  assert decoder.batch_multiple == sharding.batch_multiple(mesh) == 2
  assert all(rows % 2 == 0 for rows, _, _ in decoder.loops), decoder.loops
  assert min(rows for rows, _, _ in decoder.loops) < 16, decoder.loops
  want = np.asarray(make_translate_fn(model, 4, 0.6, EXTRA)(params, src))
  np.testing.assert_array_equal(got, want)
