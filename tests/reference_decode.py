"""Decoders without a key/value cache: the reference that cached decoding is tested against
(tests/test_decode.py) and the baseline that `python -m bench.decode --uncached` measures it
against (it imports this file as `tests.reference_decode`).

`uncached_decoder` is a `tokens_to_logits` step (see `transformer_jax.decode`) that reruns the full
decoder over all L output positions at every step, as a decoder with static shapes and no cache
does; the causal mask hides the positions not written yet.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from transformer_jax.constants import PAD_ID
from transformer_jax.decode import Cache, TokensToLogits, expand_to_beams, greedy_search, never_generated
from transformer_jax.model import Transformer
from transformer_jax.translation import check_output_length

Array = jax.Array


def uncached_decoder(model: Transformer, params: Any, encoded: Array, src: Array,
                     max_len: int) -> tuple[TokensToLogits, Cache]:
  """The decoder as a `tokens_to_logits` step that reruns the full decoder, without a cache.

  The "cache" is only the prefix written so far, [N, L] tokens. Every step runs `Transformer.decode`
  over all L positions and reads the logits at `index`; the causal mask hides the positions not
  written yet. So a step costs a full decoder pass, as it does for a decoder without a key/value
  cache and with static shapes. It serves as the reference for cached decoding and as a baseline.

  Args and Returns: as `transformer_jax.translation.cached_decoder`.
  """
  prefix = jnp.full((src.shape[0], max_len), PAD_ID, jnp.int32)

  def tokens_to_logits(tokens: Array, cache: Cache, index: Array) -> tuple[Array, Cache]:
    copies = tokens.shape[0] // src.shape[0]
    tgt_in = jax.lax.dynamic_update_slice(cache["prefix"], tokens, (0, index))
    # Every position is a real target token here, as in cached decoding.
    logits = model.apply(
        {"params": params}, expand_to_beams(encoded, copies), expand_to_beams(src, copies), tgt_in,
        tgt_segments=jnp.ones_like(tgt_in), method=Transformer.decode)
    logits = jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)
    return never_generated(logits), {"prefix": tgt_in}

  return tokens_to_logits, {"prefix": prefix}


def greedy_search_uncached(model: Transformer, params: Any, src: Array, max_len: int) -> Array:
  """Greedy decoding that reruns the full decoder at every step (see `uncached_decoder`).

  Args:
    model: the Transformer.
    params: its parameters.
    src: [B, S] source tokens, PAD_ID after the end.
    max_len: L, the most tokens to generate.

  Returns:
    [B, L] int32 generated tokens, PAD_ID after EOS_ID.
  """
  check_output_length(model, max_len)
  encoded = model.apply({"params": params}, src, method=Transformer.encode)
  tokens_to_logits, cache = uncached_decoder(model, params, encoded, src, max_len)
  return greedy_search(tokens_to_logits, cache, src.shape[0], max_len)
