"""The Transformer translating: its decoder as `decode`'s `tokens -> logits` step, `translate`
(encode once, then cached greedy or beam search, section 6.1), and its compiled forms.

`make_translate_fn` jits `translate` for one setting. A `Translator` keeps those jitted functions
for one model on one mesh, one per (beam_size, alpha, max_extra_len), and `translator(model, mesh,
rules)` hands every caller with equal arguments the same one: a run's validation passes, its
test and its later translations then reuse one compiled program per source shape instead of
compiling at every pass. A `CompactingDecoder` runs the same search from the host in several
compiled loops, dropping the examples that have finished from the batch between them: the
`translate` command's decoder.

Shapes: B batch, K beam size, S source length, L maximum output length, D d_model, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from transformer_jax import sharding
from transformer_jax.attention import ENCODER_CACHE, KEY_SLOTS, SELF_CACHE_LENGTH_AXIS
from transformer_jax.constants import PAD_ID
from transformer_jax.decode import (BeamCache, Cache, CacheGrowth, Search, TokensToLogits, beam,
                                    check_search_args, doubling_lengths, expand_to_beams, greedy,
                                    never_generated, run_search, take_examples)
from transformer_jax.model import Transformer, init_cache

Array = jax.Array
TranslateFn = Callable[[Any, Array], Array]  # (params, src [B, S]) -> tokens [B, S + max_extra_len]

FIRST_CACHE_LEN = 32  # Beam search's first self-attention cache length; see `translate`.


def decoder_context(model: Transformer, params: Any, encoded: Array, src: Array,
                    max_len: int) -> tuple[dict[str, Any], Cache]:
  """What every decoding step of a batch reads besides its own tokens, and its initial cache.

  The encoder-decoder attention's keys and values (its projection of `encoded`) are computed
  once (`init_cache`) and kept in the context, once per example: beam search never repeats or
  reorders them, and the step folds an example's K beams into K times as many queries against
  them. The cache the search carries holds only the self-attention keys and values, which do
  follow the beams.

  Args:
    model: the Transformer.
    params: its parameters.
    encoded: [B, S, D] encoder output of `src`.
    src: [B, S] source tokens (their padding masks encoder-decoder attention).
    max_len: the number of output positions the cache holds.

  Returns:
    The context (every leaf [B, ...]: "encoded", "src", and "encoder_kv", the cache entries of
    encoder-decoder attention keyed by their flattened paths), and the initial self-attention
    cache (every leaf [B, ...]).
  """
  flat = traverse_util.flatten_dict(init_cache(model, params, encoded, src, max_len))
  encoder_kv = {path: x for path, x in flat.items() if path[-1] in ENCODER_CACHE}
  self_cache = traverse_util.unflatten_dict(
      {p: x for p, x in flat.items() if p[-1] not in ENCODER_CACHE})
  return {"encoded": encoded, "src": src, "encoder_kv": encoder_kv}, self_cache


def decoder_step(model: Transformer, params: Any, context: dict[str, Any]) -> TokensToLogits:
  """The decoder as a `tokens_to_logits` step (`decode`) against its self-attention cache, for
  the batch `context` describes (`decoder_context`). It accepts any N that is a multiple of B
  whose rows match the cache's: B * C rows for C slots per example (`IN_PLACE`), or N rows of one
  slot each (`decode.ROWS`)."""
  encoder_kv, encoded, src = context["encoder_kv"], context["encoded"], context["src"]

  def tokens_to_logits(tokens: Array, cache: Cache, index: Array) -> tuple[Array, Cache]:
    copies = tokens.shape[0] // src.shape[0]
    full = traverse_util.unflatten_dict({**traverse_util.flatten_dict(cache), **encoder_kv})
    logits, variables = model.apply(
        {"params": params, "cache": full}, encoded, expand_to_beams(src, copies), tokens,
        decode_index=index, method=Transformer.decode, mutable=["cache"])
    updated = traverse_util.flatten_dict(variables["cache"])
    return never_generated(logits[:, 0]), traverse_util.unflatten_dict(
        {p: x for p, x in updated.items() if p not in encoder_kv})

  return tokens_to_logits


def cached_decoder(model: Transformer, params: Any, encoded: Array, src: Array,
                   max_len: int) -> tuple[TokensToLogits, Cache]:
  """The decoder as a `tokens_to_logits` step against its key/value cache of `max_len` output
  positions, and that cache's initial state (`decoder_context`, `decoder_step`)."""
  context, cache = decoder_context(model, params, encoded, src, max_len)
  return decoder_step(model, params, context), cache


def _by_name(fn: Callable[[str, Array], Array], cache: Cache) -> Cache:
  return jax.tree_util.tree_map_with_path(lambda path, x: fn(path[-1].key, x), cache)


def grow_self_cache(cache: Cache, length: int) -> Cache:
  """`cached_decoder`'s cache padded to `length` output positions (`CacheGrowth.grow`)."""
  key_slots = next(x for path, x in traverse_util.flatten_dict(cache).items() if path[-1] == KEY_SLOTS)
  _, slots, old = key_slots.shape

  def grow(name, x):
    if name == KEY_SLOTS:
      axis, pad = 2, length - old
    else:
      axis, pad = SELF_CACHE_LENGTH_AXIS[name], (length - old) * slots
    return jnp.pad(x, [(0, pad) if d == axis else (0, 0) for d in range(x.ndim)])

  return _by_name(grow, cache)


def _expand_slots(cache: Cache, beam_size: int) -> Cache:
  """`cached_decoder`'s cache with one slot per beam, each a copy of the example's one."""
  return _by_name(lambda name, x: jnp.repeat(
      x, beam_size, axis=1 if name == KEY_SLOTS else SELF_CACHE_LENGTH_AXIS[name]), cache)


def _reorder_slots(cache: Cache, parent: Array) -> Cache:
  """New beam k of example b continues old beam parent[b, k]: it takes over that beam's record of
  where its keys are (the decoder's key slots, [B, K, L]). Keys and values stay where they were
  written."""
  return _by_name(lambda name, x: x if name != KEY_SLOTS else jnp.take_along_axis(
      x, parent[:, :, None], axis=1, mode="promise_in_bounds"), cache)


# Beam search over `cached_decoder`'s cache: each example's K beams get one slot each, a step writes
# each beam's keys and values into its own slot, and the search reorders only the key slots,
# [B, K, L] int32, instead of every layer's keys and values (`attention.slot_mask`). A beam-4 step
# of the quick start's model on 32 examples takes 17% to 26% less time (BENCHMARKS.md, "Against
# CTranslate2").
IN_PLACE = BeamCache(_expand_slots, _reorder_slots)


def check_output_length(model: Transformer, max_len: int) -> None:
  """Raises ValueError if outputs of `max_len` tokens need positions a learned table lacks."""
  cfg = model.config
  if cfg.positional_encoding == "learned" and max_len > cfg.max_len:
    raise ValueError(
        f"output length {max_len} exceeds the {cfg.max_len} learned positions (config max_len); "
        f"use a smaller max_extra_len or shorter sources")


def translate(model: Transformer, params: Any, src: Array, *, beam_size: int, alpha: float,
              max_extra_len: int = 50, first_cache_len: int | None = None) -> Array:
  """Translates a batch of sources: encode once, then cached beam search (section 6.1).

  The output may hold up to S + max_extra_len tokens, S being the padded source length. With
  beam_size 1 it decodes greedily and alpha plays no part.

  Args:
    model: the Transformer.
    params: its parameters.
    src: [B, S] int32 source tokens, PAD_ID after the end.
    beam_size: K; the paper uses 4.
    alpha: the length penalty, see `decode.length_penalty`; the paper uses 0.6.
    max_extra_len: how many tokens the output may exceed the source by; the paper uses 50.
    first_cache_len: the self-attention cache starts with this many positions and doubles when
      the output reaches them (`doubling_lengths`), up to S + max_extra_len. Default: 32 for beam
      search, whose every query reads the K slots of every position; greedy search keeps the whole
      length, as each stage is compiled apart and its cache costs little (BENCHMARKS.md,
      "Decoding").

  Returns:
    [B, S + max_extra_len] int32 tokens of the best hypothesis, PAD_ID after EOS_ID.
  """
  batch_size, src_len = src.shape
  max_len = src_len + max_extra_len
  check_output_length(model, max_len)
  encoded = model.apply({"params": params}, src, method=Transformer.encode)
  lengths = cache_lengths(beam_size, max_len, first_cache_len)
  tokens_to_logits, cache = cached_decoder(model, params, encoded, src, lengths[0])
  search = make_search(tokens_to_logits, batch_size, max_len, beam_size, alpha)
  return search.best(run_search(search, search.init(cache), max_len,
                                CacheGrowth(lengths, grow_self_cache)))


def cache_lengths(beam_size: int, max_len: int, first_cache_len: int | None) -> tuple[int, ...]:
  """The self-attention cache's lengths as the output grows (see `translate`)."""
  if first_cache_len is None:
    first_cache_len = FIRST_CACHE_LEN if beam_size > 1 else max_len
  return doubling_lengths(max_len, first_cache_len)


def make_search(tokens_to_logits: TokensToLogits, batch_size: int, max_len: int, beam_size: int,
                alpha: float) -> Search:
  """Greedy search for beam_size 1, else beam search with length penalty alpha."""
  if beam_size == 1:
    return greedy(tokens_to_logits, batch_size, max_len)
  return beam(tokens_to_logits, batch_size, beam_size, max_len, alpha, IN_PLACE)


def check_translate_args(beam_size: int, alpha: float, max_extra_len: int) -> None:
  """Raises ValueError, naming the value, for a decoding setting that cannot be compiled."""
  check_search_args(1, 1, beam_size, alpha)
  if not isinstance(max_extra_len, int) or max_extra_len < 0:
    raise ValueError(f"max_extra_len={max_extra_len!r} must be an int >= 0")


def make_translate_fn(model: Transformer, beam_size: int, alpha: float, max_extra_len: int = 50,
                      first_cache_len: int | None = None) -> TranslateFn:
  """`translate` compiled with `jax.jit`: `(params, src [B, S]) -> tokens [B, S + max_extra_len]`.

  It compiles once per source shape; batching sources into a few padded lengths keeps the number
  of compilations small.
  """
  check_translate_args(beam_size, alpha, max_extra_len)

  @jax.jit
  def translate_fn(params: Any, src: Array) -> Array:
    return translate(model, params, src, beam_size=beam_size, alpha=alpha,
                     max_extra_len=max_extra_len, first_cache_len=first_cache_len)

  return translate_fn


class CompactingDecoder:
  """`translate` driven from the host, dropping finished examples from the batch as it goes.

  In `translate`'s one compiled loop the examples that have ended go on being computed (as
  padding, or as beams that can no longer win) until the last one ends: in a beam-4 batch of the
  quick start's 32 first test verses only 54% of the example-steps belong to examples still
  searching. This decoder runs the same search (`decode.Search`) in compiled loops that also stop
  once at most half of the batch is still searching; between loops it keeps the ended examples'
  outputs on the host and gathers the others (padded with ended ones if fewer) into a batch half
  the size, down to one example. Its outputs equal `translate`'s token for token.

  The price: one program per batch size and cache length that a batch reaches (compiled when first
  needed, then kept), and one wait for the device per loop. For serving and files, one process:
  `Translator.fn(..., compact=True)`; validation during training keeps `translate`, one program
  per batch shape.
  """

  def __init__(self, model: Transformer, beam_size: int, alpha: float, max_extra_len: int = 50,
               first_cache_len: int | None = None, batch_multiple: int = 1):
    """batch_multiple: a batch is never cut to a size that is not a multiple of this (the
    devices a batch is split over)."""
    check_translate_args(beam_size, alpha, max_extra_len)
    self.model, self.beam_size, self.alpha = model, beam_size, alpha
    self.max_extra_len, self.first_cache_len = max_extra_len, first_cache_len
    self.batch_multiple = batch_multiple
    # The last batch's loops, as (examples in the batch, cache length, steps run): what it did.
    self.loops: list[tuple[int, int, int]] = []
    self._start = jax.jit(self._start_fn)
    self._run = jax.jit(self._run_fn, static_argnums=(3, 4))
    self._grow = jax.jit(lambda state, length: (*state[:-1], grow_self_cache(state[-1], length)),
                         static_argnums=1)
    self._take = jax.jit(lambda context, state, examples: (
        jax.tree.map(lambda x: x[examples], context),
        take_examples(state, examples, context["src"].shape[0])))

  def _search(self, params: Any, context: dict[str, Any]) -> Search:
    batch_size, src_len = context["src"].shape
    return make_search(decoder_step(self.model, params, context), batch_size,
                       src_len + self.max_extra_len, self.beam_size, self.alpha)

  def _start_fn(self, params: Any, src: Array) -> tuple[dict[str, Any], tuple]:
    max_len = src.shape[1] + self.max_extra_len
    encoded = self.model.apply({"params": params}, src, method=Transformer.encode)
    first = cache_lengths(self.beam_size, max_len, self.first_cache_len)[0]
    context, cache = decoder_context(self.model, params, encoded, src, first)
    return context, self._search(params, context).init(cache)

  def _run_fn(self, params: Any, context: dict[str, Any], state: tuple, cache_len: int,
              floor: int) -> tuple[tuple, Array, Array]:
    """Steps until every example is done, the cache is full, or at most `floor` search on."""
    search = self._search(params, context)

    def going(state):
      searching = ~search.done(state)
      return (state[0] < cache_len) & jnp.any(searching) & (jnp.sum(searching) > floor)

    state = jax.lax.while_loop(going, search.step, state)
    return state, search.done(state), search.best(state)

  def __call__(self, params: Any, src: Array) -> np.ndarray:
    """[B, S + max_extra_len] int32 tokens of each source's best hypothesis, as `translate`."""
    batch_size, src_len = src.shape
    max_len = src_len + self.max_extra_len
    check_output_length(self.model, max_len)
    lengths = cache_lengths(self.beam_size, max_len, self.first_cache_len)
    out = np.full((batch_size, max_len), PAD_ID, np.int32)
    rows = np.arange(batch_size)  # The source row of each example in the batch.
    context, state = self._start(params, src)
    stage, index = 0, 0
    self.loops = []
    while True:
      half = len(rows) // 2
      floor = half if half and half % self.batch_multiple == 0 else 0
      state, done, best = self._run(params, context, state, lengths[stage], floor)
      self.loops.append((len(rows), lengths[stage], int(state[0]) - index))
      index, done = int(state[0]), np.asarray(done)
      if index >= max_len or done.all():
        out[rows] = np.asarray(best)
        return out
      if index >= lengths[stage]:
        stage += 1
        state = self._grow(state, lengths[stage])
        continue
      ended, searching = np.flatnonzero(done), np.flatnonzero(~done)
      out[rows[ended]] = np.asarray(best)[ended]
      keep = np.concatenate([searching, ended[:floor - len(searching)]])
      context, state = self._take(context, state, jnp.asarray(keep, jnp.int32))
      rows = rows[keep]


class Translator:
  """`translate` of one model, jitted for one mesh and its logical axis rules, once per setting.

  Each (beam_size, alpha, max_extra_len) gets its jitted function the first time it is asked for
  and keeps it, so XLA compiles a setting once per source shape for as long as the Translator
  lives (a new jitted function would compile again, even for shapes seen before).
  """

  def __init__(self, model: Transformer, mesh: jax.sharding.Mesh, rules: tuple):
    self.model = model
    self.mesh = mesh
    self.rules = rules
    self._jitted: dict[tuple[int, float, int], TranslateFn] = {}
    self._compacting: dict[tuple[int, float, int], CompactingDecoder] = {}

  def jit_fn(self, beam_size: int, alpha: float, max_extra_len: int) -> TranslateFn:
    """The jax.jit object of a setting (`make_translate_fn`), to call inside the mesh and the
    rules, or to lower ahead of time."""
    key = (beam_size, float(alpha), max_extra_len)
    if key not in self._jitted:
      self._jitted[key] = make_translate_fn(self.model, beam_size, alpha, max_extra_len)
    return self._jitted[key]

  def fn(self, beam_size: int, alpha: float, max_extra_len: int,
         compact: bool = False) -> TranslateFn:
    """`(params, src [B, S]) -> tokens [B, S + max_extra_len]`, run inside the mesh and the logical
    axis rules, so that the model's sharding constraints hold while decoding too. With `compact`
    (one process only; ignored with several) a `CompactingDecoder` drops finished examples."""
    if compact and jax.process_count() == 1:
      key = (beam_size, float(alpha), max_extra_len)
      if key not in self._compacting:
        self._compacting[key] = CompactingDecoder(
            self.model, beam_size, alpha, max_extra_len,
            batch_multiple=sharding.batch_multiple(self.mesh))
      decoder = self._compacting[key]
    else:
      decoder = self.jit_fn(beam_size, alpha, max_extra_len)

    def translate_batch(params: Any, src: Array) -> Array:
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return decoder(params, src)

    return translate_batch


@functools.lru_cache(maxsize=8)
def translator(model: Transformer, mesh: jax.sharding.Mesh, rules: tuple) -> Translator:
  """The `Translator` of (model, mesh, rules): the same object for equal arguments (the last 8
  kept), so that callers holding only a run's setup (`evaluate.translate_corpus`, called at every
  validation pass) share its compiled programs."""
  return Translator(model, mesh, rules)
