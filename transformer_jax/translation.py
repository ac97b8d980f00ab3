"""The Transformer translating: its decoder as `decode`'s `tokens -> logits` step, `translate`
(encode once, then cached greedy or beam search, section 6.1), and its compiled forms.

`make_translate_fn` jits `translate` for one setting. A `Translator` keeps those jitted functions
for one model on one mesh, one per (beam_size, alpha, max_extra_len), and `translator(model, mesh,
rules)` hands every caller with equal arguments the same one: a run's validation passes, its
test and its later translations then reuse one compiled program per source shape instead of
compiling at every pass.

Shapes: B batch, K beam size, S source length, L maximum output length, D d_model, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from transformer_jax.attention import ENCODER_CACHE, SELF_CACHE_LENGTH_AXIS
from transformer_jax.decode import (Cache, CacheGrowth, TokensToLogits, beam_search, check_search_args,
                                    doubling_lengths, expand_to_beams, greedy_search, never_generated)
from transformer_jax.model import Transformer, init_cache

Array = jax.Array
TranslateFn = Callable[[Any, Array], Array]  # (params, src [B, S]) -> tokens [B, S + max_extra_len]

FIRST_CACHE_LEN = 32  # Beam search's first self-attention cache length; see `translate`.


def cached_decoder(model: Transformer, params: Any, encoded: Array, src: Array,
                   max_len: int) -> tuple[TokensToLogits, Cache]:
  """The decoder as a `tokens_to_logits` step against its key/value cache.

  The encoder-decoder attention's keys and values (its projection of `encoded`) are computed
  once (`init_cache`) and held by the step itself, once per example: beam search never repeats
  or reorders them, and the step folds an example's K beams into K times as many queries
  against them. The cache the search carries holds only the self-attention keys and values,
  which do follow the beams. The step accepts any N that is a multiple of B.

  Args:
    model: the Transformer.
    params: its parameters.
    encoded: [B, S, D] encoder output of `src`.
    src: [B, S] source tokens (their padding masks encoder-decoder attention).
    max_len: L, the number of output positions the cache holds.

  Returns:
    tokens_to_logits, and its initial cache (every leaf [B, ...]).
  """
  flat = traverse_util.flatten_dict(init_cache(model, params, encoded, src, max_len))
  encoder_kv = {path: x for path, x in flat.items() if path[-1] in ENCODER_CACHE}
  self_cache = traverse_util.unflatten_dict({p: x for p, x in flat.items() if p not in encoder_kv})

  def tokens_to_logits(tokens: Array, cache: Cache, index: Array) -> tuple[Array, Cache]:
    copies = tokens.shape[0] // src.shape[0]
    full = traverse_util.unflatten_dict({**traverse_util.flatten_dict(cache), **encoder_kv})
    logits, variables = model.apply(
        {"params": params, "cache": full}, encoded, expand_to_beams(src, copies), tokens,
        decode_index=index, method=Transformer.decode, mutable=["cache"])
    updated = traverse_util.flatten_dict(variables["cache"])
    return never_generated(logits[:, 0]), traverse_util.unflatten_dict(
        {p: x for p, x in updated.items() if p not in encoder_kv})

  return tokens_to_logits, self_cache


def grow_self_cache(cache: Cache, length: int) -> Cache:
  """`cached_decoder`'s cache padded to `length` output positions (`CacheGrowth.grow`)."""
  axis = SELF_CACHE_LENGTH_AXIS
  return jax.tree.map(lambda x: jnp.pad(x, [(0, length - x.shape[axis]) if d == axis else (0, 0)
                                            for d in range(x.ndim)]), cache)


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
      search, which reorders its cache at every step; greedy search keeps the whole length, as
      each stage is compiled apart and its cache costs little (BENCHMARKS.md, "Decoding").

  Returns:
    [B, S + max_extra_len] int32 tokens of the best hypothesis, PAD_ID after EOS_ID.
  """
  batch_size, src_len = src.shape
  max_len = src_len + max_extra_len
  check_output_length(model, max_len)
  encoded = model.apply({"params": params}, src, method=Transformer.encode)
  if first_cache_len is None:
    first_cache_len = FIRST_CACHE_LEN if beam_size > 1 else max_len
  lengths = doubling_lengths(max_len, first_cache_len)
  tokens_to_logits, cache = cached_decoder(model, params, encoded, src, lengths[0])
  growth = CacheGrowth(lengths, grow_self_cache)
  if beam_size == 1:
    return greedy_search(tokens_to_logits, cache, batch_size, max_len, growth)
  sequences, _ = beam_search(tokens_to_logits, cache, batch_size, beam_size, max_len, alpha, growth)
  return sequences[:, 0]


def make_translate_fn(model: Transformer, beam_size: int, alpha: float, max_extra_len: int = 50,
                      first_cache_len: int | None = None) -> TranslateFn:
  """`translate` compiled with `jax.jit`: `(params, src [B, S]) -> tokens [B, S + max_extra_len]`.

  It compiles once per source shape; batching sources into a few padded lengths keeps the number
  of compilations small.
  """
  check_search_args(1, 1, beam_size, alpha)
  if not isinstance(max_extra_len, int) or max_extra_len < 0:
    raise ValueError(f"max_extra_len={max_extra_len!r} must be an int >= 0")

  @jax.jit
  def translate_fn(params: Any, src: Array) -> Array:
    return translate(model, params, src, beam_size=beam_size, alpha=alpha,
                     max_extra_len=max_extra_len, first_cache_len=first_cache_len)

  return translate_fn


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

  def jit_fn(self, beam_size: int, alpha: float, max_extra_len: int) -> TranslateFn:
    """The jax.jit object of a setting (`make_translate_fn`), to call inside the mesh and the
    rules, or to lower ahead of time."""
    key = (beam_size, float(alpha), max_extra_len)
    if key not in self._jitted:
      self._jitted[key] = make_translate_fn(self.model, beam_size, alpha, max_extra_len)
    return self._jitted[key]

  def fn(self, beam_size: int, alpha: float, max_extra_len: int) -> TranslateFn:
    """`(params, src [B, S]) -> tokens [B, S + max_extra_len]`, run inside the mesh and the logical
    axis rules, so that the model's sharding constraints hold while decoding too."""
    jitted = self.jit_fn(beam_size, alpha, max_extra_len)

    def translate_batch(params: Any, src: Array) -> Array:
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return jitted(params, src)

    return translate_batch


@functools.lru_cache(maxsize=8)
def translator(model: Transformer, mesh: jax.sharding.Mesh, rules: tuple) -> Translator:
  """The `Translator` of (model, mesh, rules): the same object for equal arguments (the last 8
  kept), so that callers holding only a run's setup (`evaluate.translate_corpus`, called at every
  validation pass) share its compiled programs."""
  return Translator(model, mesh, rules)
