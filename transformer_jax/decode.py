"""Greedy and beam search (section 6.1), over a `tokens -> logits` callable.

The search functions know nothing about Flax or the model (`translation` drives them with the
Transformer's decoder). They drive a callable

  tokens_to_logits(tokens [N, 1] int32, cache, index int32 scalar) -> (logits [N, V] float32, cache)

that reads the token at output position `index` (BOS_ID at position 0) and returns the logits of
the token at position `index + 1`, together with its updated cache. By default every leaf of the
cache has the flattened batch N as its leading axis, so keeping some hypotheses and dropping others
is a gather on axis 0 of every leaf (`ROWS`); a model may keep its keys where they were written and
say how its cache follows the hypotheses instead (`BeamCache`). That is all the search assumes, so
the tests drive it with fake models whose best output can be found by enumerating every sequence.

Shapes: B batch, K beam size, N = B * K flattened rows, L maximum output length, S source length,
D d_model, V vocabulary.

Outputs hold the generated tokens only (no BOS_ID): EOS_ID ends a sequence and PAD_ID follows it. A
sequence without EOS_ID ran out of room at L tokens.

A cache may also grow as the output does (`CacheGrowth`), so that a batch whose outputs end early
does not read and reorder the L positions it was allowed at every step. Each search also comes in
pieces (`Search`: init, step, done, best) for drivers that run the steps themselves.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from transformer_jax.constants import BOS_ID, EOS_ID, NEG_INF, PAD_ID
from transformer_jax.topk import per_device_top_k

Array = jax.Array
Cache = Any
TokensToLogits = Callable[[Array, Cache, Array], tuple[Array, Cache]]



class CacheGrowth(NamedTuple):
  """A cache that grows with the output, in stages.

  The initial cache holds `lengths[0]` output positions; the search runs steps 0 .. lengths[0] - 1
  against it, then `grow(cache, lengths[1])` pads it, and so on up to L. Each stage is its own
  loop in the compiled program: one that is never reached costs compilation time only.
  """

  lengths: tuple[int, ...]
  grow: Callable[[Cache, int], Cache]


def doubling_lengths(max_len: int, first: int) -> tuple[int, ...]:
  """Cache lengths first, 2 first, 4 first, ... below max_len, then max_len (`first` >= max_len:
  one stage). A step then reads at most twice the positions written, once `first` are."""
  if not isinstance(first, int) or first < 1:
    raise ValueError(f"first={first!r} must be a positive int")
  lengths = []
  while first < max_len:
    lengths.append(first)
    first *= 2
  return (*lengths, max_len)


def length_penalty(length: Array | int, alpha: float) -> Array:
  """The GNMT length penalty lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al., 2016).

  A hypothesis is ranked by log P(Y | X) / lp(Y). Log-probabilities only fall as a hypothesis
  grows; dividing by a penalty that grows with length stops the search from favouring short
  outputs. alpha = 0 ranks by log-probability alone.

  Args:
    length: |Y|, the number of generated tokens, EOS_ID included (BOS_ID is not generated).
    alpha: the strength of the penalty; the paper uses 0.6.

  Returns:
    The penalty, float32, with the shape of `length`.
  """
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def expand_to_beams(tree: Any, beam_size: int) -> Any:
  """Repeats every leaf `beam_size` times on axis 0: rows [B, ...] -> [B * K, ...].

  Row b * K + k is beam k of example b, the layout `beam_search` uses for its cache.
  """
  if beam_size == 1:
    return tree
  return jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0), tree)


def gather_beams(tree: Any, parent: Array) -> Any:
  """Every leaf [B * K, ...] reordered to follow the surviving beams: new beam k of example b is
  old beam parent[b, k] of the same example.

  The gather runs within each example ([B, K, ...] on axis 1), so with the batch split over
  devices each device reorders its own rows, with no communication.
  """
  B, K = parent.shape

  def gather(x: Array) -> Array:
    x = x.reshape(B, K, *x.shape[1:])
    index = parent.reshape(B, K, *([1] * (x.ndim - 2)))
    # In bounds by construction: without the promise, XLA adds a pass that fills out-of-bounds rows.
    return jnp.take_along_axis(x, index, axis=1, mode="promise_in_bounds").reshape(B * K, *x.shape[2:])

  return jax.tree.map(gather, tree)


class BeamCache(NamedTuple):
  """How a beam search's cache follows its hypotheses.

  `expand(cache, K)` turns the initial cache of B examples into one for their K hypotheses each;
  `reorder(cache, parent)` makes new hypothesis k of example b the continuation of old hypothesis
  parent[b, k] ([B, K] int32). `ROWS` does both on axis 0 of every leaf.
  """

  expand: Callable[[Cache, int], Cache]
  reorder: Callable[[Cache, Array], Cache]


ROWS = BeamCache(expand_to_beams, gather_beams)


def check_search_args(batch_size: int, max_len: int, beam_size: int = 1, alpha: float = 0.0) -> None:
  """Raises ValueError, naming the value, for search settings that cannot fix a program's shapes."""
  for name, value in (("batch_size", batch_size), ("max_len", max_len), ("beam_size", beam_size)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive int (it fixes array shapes)")
  if not alpha >= 0:
    # The early stop bounds an alive hypothesis by the penalty of the longest output, which is the
    # largest penalty only when it grows with length.
    raise ValueError(f"alpha={alpha!r} must be >= 0")


def _search_loop(not_finished, step, state: tuple, max_len: int, growth: CacheGrowth | None):
  """`lax.while_loop(not_finished, step, state)` over state (step index, ..., cache), in stages
  when the cache grows: stage j runs while the index is below lengths[j], the cache's length."""
  if growth is None:
    return jax.lax.while_loop(not_finished, step, state)
  lengths = tuple(growth.lengths)
  if not lengths or lengths[-1] != max_len or any(a >= b for a, b in zip(lengths, lengths[1:])):
    raise ValueError(f"cache lengths {lengths} must increase to max_len={max_len}")
  for stage, length in enumerate(lengths):
    if stage:
      state = (*state[:-1], growth.grow(state[-1], length))
    state = jax.lax.while_loop(lambda s, n=length: not_finished(s) & (s[0] < n), step, state)
  return state


class Search(NamedTuple):
  """A search in pieces, for drivers that run its steps themselves.

  `greedy_search` and `beam_search` run one over `_search_loop`; `translation.CompactingDecoder`
  runs it in loops of its own and drops finished examples from the batch between them. The state
  is a tuple: the step index (int32 scalar) first, the cache last (where `_search_loop` grows it).
  Every leaf after the index has a leading axis that holds B examples' rows in order (B rows, or
  B * K with an example's beams together), so keeping a subset of examples is a gather on that
  axis of every leaf but the first (`take_examples`).
  """

  init: Callable[[Cache], tuple]  # The initial state from the initial cache (every leaf [B, ...]).
  step: Callable[[tuple], tuple]
  done: Callable[[tuple], Array]  # [B] bool: the example's output is final.
  best: Callable[[tuple], Array]  # [B, L] int32: each example's best output so far.


def take_examples(state: tuple, examples: Array, batch_size: int) -> tuple:
  """A `Search` state of `batch_size` examples cut to `examples` (int32 indices), in that order."""
  def take(x):
    rows = x.reshape(batch_size, x.shape[0] // batch_size, *x.shape[1:])[examples]
    return rows.reshape(-1, *x.shape[1:])
  return (state[0], *jax.tree.map(take, state[1:]))


def run_search(search: Search, state: tuple, max_len: int, growth: CacheGrowth | None) -> tuple:
  """The state after `search`'s steps until every example is done or max_len tokens were made."""
  return _search_loop(lambda s: (s[0] < max_len) & ~jnp.all(search.done(s)), search.step, state,
                      max_len, growth)


def greedy(tokens_to_logits: TokensToLogits, batch_size: int, max_len: int) -> Search:
  """Greedy decoding in pieces (`greedy_search` runs them). State: (index, tokens [B, L], last
  token [B], done [B], cache)."""
  check_search_args(batch_size, max_len)

  def init(cache):
    return (jnp.int32(0), jnp.full((batch_size, max_len), PAD_ID, jnp.int32),
            jnp.full((batch_size,), BOS_ID, jnp.int32), jnp.zeros((batch_size,), jnp.bool_), cache)

  def step(state):
    i, tokens, last, done, cache = state
    logits, cache = tokens_to_logits(last[:, None], cache, i)
    # Finished rows emit padding (their outputs are unused). Top-1: argmax, 6x faster on a CPU.
    best = per_device_top_k(logits, 1)[1][:, 0].astype(jnp.int32)
    next_token = jnp.where(done, PAD_ID, best)
    tokens = jax.lax.dynamic_update_slice(tokens, next_token[:, None], (0, i))
    return i + 1, tokens, next_token, done | (next_token == EOS_ID), cache

  return Search(init, step, done=lambda state: state[3], best=lambda state: state[1])


def greedy_search(tokens_to_logits: TokensToLogits, cache: Cache, batch_size: int,
                  max_len: int, growth: CacheGrowth | None = None) -> Array:
  """Greedy decoding: at every step, the most probable next token.

  Stops as soon as every sequence has produced EOS_ID, or after `max_len` tokens. Traceable:
  `batch_size` and `max_len` must be static under `jax.jit`.

  Args:
    tokens_to_logits: the model step, see the module docstring; called with N = B rows.
    cache: its initial state; every leaf [B, ...].
    batch_size: B.
    max_len: L, the most tokens to generate (EOS_ID included).
    growth: how the cache grows, if it does; without it the cache holds L positions from the start.

  Returns:
    [B, L] int32 generated tokens, PAD_ID after EOS_ID.
  """
  search = greedy(tokens_to_logits, batch_size, max_len)
  return search.best(run_search(search, search.init(cache), max_len, growth))


def beam(tokens_to_logits: TokensToLogits, batch_size: int, beam_size: int, max_len: int,
         alpha: float = 0.6, follow: BeamCache = ROWS) -> Search:
  """Beam search in pieces (`beam_search` runs them and says what they do). State: (index, alive
  sequences [B, K, L], alive log-probabilities [B, K], alive last tokens [B, K], finished scores
  [B, K], finished sequences [B, K, L], cache as `follow.expand` makes it)."""
  check_search_args(batch_size, max_len, beam_size, alpha)
  B, K, L = batch_size, beam_size, max_len
  max_penalty = length_penalty(L, alpha)

  def init(cache):
    # Only beam 0 is alive at the start; the others hold -inf so that the first step does not
    # extend K copies of the same hypothesis.
    return (
        jnp.int32(0),
        jnp.full((B, K, L), PAD_ID, jnp.int32),
        jnp.broadcast_to(jnp.where(jnp.arange(K) == 0, 0.0, NEG_INF).astype(jnp.float32), (B, K)),
        jnp.full((B, K), BOS_ID, jnp.int32),
        jnp.full((B, K), NEG_INF, jnp.float32),
        jnp.full((B, K, L), PAD_ID, jnp.int32),
        follow.expand(cache, K),
    )

  def done(state):
    _, _, alive_logprob, _, finished_scores, _, _ = state
    best_possible = jnp.max(alive_logprob, axis=1) / max_penalty
    return best_possible <= jnp.min(finished_scores, axis=1)

  def step(state):
    i, alive_seqs, alive_logprob, alive_last, finished_scores, finished_seqs, cache = state
    logits, cache = tokens_to_logits(alive_last.reshape(B * K, 1), cache, i)
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    V = logprobs.shape[-1]
    candidates = alive_logprob[:, :, None] + logprobs.reshape(B, K, V)  # [B, K, V]

    # Each alive hypothesis has one EOS extension, so the best 2K extensions hold at least K that
    # do not end: enough to refill the alive list.
    top_logprob, top_index = per_device_top_k(candidates.reshape(B, K * V), 2 * K)  # [B, 2K]
    top_beam, top_token = top_index // V, top_index % V
    top_seqs = jnp.take_along_axis(alive_seqs, top_beam[:, :, None], axis=1)  # [B, 2K, L]
    top_seqs = jax.lax.dynamic_update_slice(top_seqs, top_token[:, :, None], (0, 0, i))
    ends = top_token == EOS_ID

    # Finished: extensions ending in EOS_ID among the best K, merged with those found before. Only
    # the best K count, as in the textbook beam of K hypotheses from which an ended one leaves;
    # that is what makes K = 1 greedy.
    in_beam = jnp.arange(2 * K) < K
    new_scores = jnp.where(ends & in_beam, top_logprob / length_penalty(i + 1, alpha), NEG_INF)
    merged_scores = jnp.concatenate([finished_scores, new_scores], axis=1)  # [B, 3K]
    merged_seqs = jnp.concatenate([finished_seqs, top_seqs], axis=1)
    finished_scores, keep = per_device_top_k(merged_scores, K)
    finished_seqs = jnp.take_along_axis(merged_seqs, keep[:, :, None], axis=1)

    # Alive: the best K extensions that do not end.
    alive_logprob, keep = per_device_top_k(jnp.where(ends, NEG_INF, top_logprob), K)
    alive_seqs = jnp.take_along_axis(top_seqs, keep[:, :, None], axis=1)
    alive_last = jnp.take_along_axis(top_token, keep, axis=1)
    cache = follow.reorder(cache, jnp.take_along_axis(top_beam, keep, axis=1))
    return i + 1, alive_seqs, alive_logprob, alive_last, finished_scores, finished_seqs, cache

  return Search(init, step, done, best=lambda state: _beam_outputs(state, max_penalty)[0][:, 0])


def _beam_outputs(state: tuple, max_penalty: Array) -> tuple[Array, Array]:
  """`beam_search`'s (sequences, scores) from the state of `beam`'s steps."""
  _, alive_seqs, alive_logprob, _, finished_scores, finished_seqs, _ = state
  # An example with real alive hypotheses is never done before max_len, so alive ones that are
  # returned have L tokens.
  any_finished = finished_scores[:, 0] > NEG_INF  # [B]
  sequences = jnp.where(any_finished[:, None, None], finished_seqs, alive_seqs)
  scores = jnp.where(any_finished[:, None], finished_scores, alive_logprob / max_penalty)
  return sequences, scores


def beam_search(tokens_to_logits: TokensToLogits, cache: Cache, batch_size: int, beam_size: int,
                max_len: int, alpha: float = 0.6, growth: CacheGrowth | None = None,
                follow: BeamCache = ROWS) -> tuple[Array, Array]:
  """Beam search with the GNMT length penalty, as in section 6.1 (beam 4, alpha 0.6).

  Each example keeps K alive hypotheses (not yet ended) and K finished ones (ended by EOS_ID).
  A step extends every alive hypothesis by every token and ranks the K * V extensions by summed
  log-probability. An extension that ends in EOS_ID and ranks among the best K leaves the beam as
  finished, scored log P(Y | X) / lp(|Y|) with |Y| its number of tokens, EOS_ID included (see
  `length_penalty`); the finished list keeps the K best scores seen so far. The alive list becomes
  the K best extensions that do not end in EOS_ID. With K = 1 and alpha = 0 this is greedy
  decoding; with alpha > 0 a single beam may go on past the greedy output's EOS_ID, because a
  longer output can still win once its penalty is counted.

  Early stop: an alive hypothesis with log-probability a can at best end with score
  a / lp(max_len), since its log-probability can only fall and for alpha >= 0 the penalty is
  largest at the longest length. An example is done when the best alive bound is no better than
  (<=) the worst of its K finished scores, an empty slot counting as -inf, so the K finished
  hypotheses are final. The loop runs until every example is done or max_len tokens were generated.

  Traceable: `batch_size`, `beam_size`, `max_len` and `alpha` must be static under `jax.jit`.

  Args:
    tokens_to_logits: the model step, see the module docstring; called with N = B * K rows, row
      b * K + k being beam k of example b.
    cache: the initial state for B examples, every leaf [B, ...]; `follow.expand` makes it one
      for K hypotheses each (by default `expand_to_beams`, every row repeated K times).
    batch_size: B.
    beam_size: K.
    max_len: L, the most tokens a hypothesis may have (EOS_ID included).
    alpha: the length penalty's strength, >= 0.
    growth: how the cache grows, if it does (see `greedy_search`).
    follow: how the cache follows the hypotheses (`BeamCache`).

  Returns:
    sequences: [B, K, L] int32, best first, PAD_ID after EOS_ID.
    scores: [B, K] float32 log P(Y | X) / lp(|Y|), descending. Slots that no hypothesis reached
      hold -inf. An example with no finished hypothesis at all returns its alive ones instead,
      scored with |Y| = L.
  """
  search = beam(tokens_to_logits, batch_size, beam_size, max_len, alpha, follow)
  state = run_search(search, search.init(cache), max_len, growth)
  return _beam_outputs(state, length_penalty(max_len, alpha))


def never_generated(logits: Array) -> Array:
  """[..., V] logits with PAD_ID and BOS_ID made impossible: a translation never contains them.

  A trained model gives them almost no probability anyway (neither is ever a training target);
  this makes it a rule, for any weights, as Marian's generation config does for its padding.
  """
  return logits.at[..., jnp.array([PAD_ID, BOS_ID])].set(NEG_INF)
