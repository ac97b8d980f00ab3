"""Scaled dot-product and multi-head attention against plain NumPy references (section 3.2)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from transformer_jax.attention import (MultiHeadAttention, causal_mask, fold_beams,
                                       scaled_dot_product_attention, segment_mask, slot_mask)
from transformer_jax.constants import MASK_VALUE


def numpy_attention(q, k, v, mask):
  """softmax(Q K^T / sqrt(d_k)) V for one batch element and one head: q [T, K], k [S, K], v [S, H]."""
  logits = q @ k.T / np.sqrt(q.shape[-1])
  logits = np.where(mask, logits, MASK_VALUE)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return weights @ v


def test_scaled_dot_product_attention_matches_numpy():
  rng = np.random.default_rng(0)
  B, T, S, N, K, H = 2, 3, 5, 2, 4, 6
  q, k = rng.normal(size=(B, T, N, K)), rng.normal(size=(B, S, N, K))
  v = rng.normal(size=(B, S, N, H))
  mask = rng.random((B, 1, T, S)) > 0.3
  mask[..., 0] = True  # At least one visible key per row.
  out, weights = scaled_dot_product_attention(*map(jnp.asarray, (q, k, v, mask)))
  assert out.shape == (B, T, N, H) and weights.shape == (B, N, T, S)
  for b in range(B):
    for n in range(N):
      expected = numpy_attention(q[b, :, n], k[b, :, n], v[b, :, n], mask[b, 0])
      np.testing.assert_allclose(out[b, :, n], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  assert np.all(np.asarray(weights)[~np.broadcast_to(mask, weights.shape)] < 1e-6)


def test_the_cache_layout_attends_alike():
  """Keys [B, N, K, S] and values [B, N, S, H], as decoding caches store them: same attention."""
  rng = np.random.default_rng(2)
  B, T, S, N, K, H = 2, 3, 5, 2, 4, 6
  q, k, v = (jnp.asarray(rng.normal(size=shape)) for shape in ((B, T, N, K), (B, S, N, K), (B, S, N, H)))
  mask = jnp.asarray(rng.random((B, 1, T, S)) > 0.3).at[..., 0].set(True)
  out, weights = scaled_dot_product_attention(q, k, v, mask)
  cached_out, cached_weights = scaled_dot_product_attention(
      q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask, cache_layout=True)
  np.testing.assert_allclose(cached_out, out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cached_weights, weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("index", [0, 3, 5])
def test_slot_mask_reads_each_rows_history_where_its_slots_say(index):
  """Attention over a cache of C slots through `slot_mask` equals, for each row, attention over its
  own history gathered position by position from the slots that key_slots names."""
  rng = np.random.default_rng(index)
  B, C, L, N, K, H = 2, 3, 6, 2, 4, 5
  keys = rng.normal(size=(B, N, L, C, K))  # Position-major slots, as the cache stores them.
  values = rng.normal(size=(B, N, L, C, H))
  key_slots = rng.integers(0, C, (B, C, L))
  q = rng.normal(size=(B * C, 1, N, K))  # One query per row, at position `index`.
  mask = slot_mask(jnp.asarray(key_slots, jnp.int32), jnp.int32(index), 1)
  assert mask.shape == (B, 1, C, L * C)
  out, _ = scaled_dot_product_attention(
      fold_beams(jnp.asarray(q), C), jnp.asarray(keys.reshape(B, N, L * C, K).transpose(0, 1, 3, 2)),
      jnp.asarray(values.reshape(B, N, L * C, H)), mask, cache_layout=True)
  for b in range(B):
    for c in range(C):
      history = key_slots[b, c, :index + 1]  # The slot of each position 0 .. index.
      for n in range(N):
        k = keys[b, n, np.arange(index + 1), history]
        v = values[b, n, np.arange(index + 1), history]
        expected = numpy_attention(q[b * C + c, :, n], k, v, np.ones((1, index + 1), bool))
        np.testing.assert_allclose(out[b, c, n], expected[0], rtol=1e-5, atol=1e-6)


def _mha_params(config, x, y, mask):
  module = MultiHeadAttention(config, self_attention=False)
  params = nn.meta.unbox(module.init(jax.random.key(1), x, y, mask))["params"]
  return module, jax.tree.map(np.asarray, params)


@pytest.mark.parametrize("d_k,d_v", [(None, None), (4, 12)])
def test_multi_head_attention_equals_a_loop_over_heads(d_k, d_v):
  config = tiny_config(d_k=d_k, d_v=d_v)
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(2, 3, config.d_model)), rng.normal(size=(2, 5, config.d_model))
  mask = np.ones((2, 1, 3, 5), bool)
  mask[1, :, :, 3:] = False
  module, p = _mha_params(config, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))
  out = module.apply({"params": p}, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))

  # head_i = Attention(x W_i^Q, y W_i^K, y W_i^V); MultiHead = Concat(head_1..head_h) W^O.
  for b in range(2):
    heads = []
    for i in range(config.num_heads):
      q = x[b] @ p["query"]["kernel"][:, i] + p["query"]["bias"][i]
      k = y[b] @ p["key"]["kernel"][:, i] + p["key"]["bias"][i]
      v = y[b] @ p["value"]["kernel"][:, i] + p["value"]["bias"][i]
      heads.append(numpy_attention(q, k, v, mask[b, 0]))
    w_o = p["out"]["kernel"].reshape(-1, config.d_model)  # [h * d_v, d_model]
    expected = np.concatenate(heads, -1) @ w_o + p["out"]["bias"]
    np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=1e-5)


def test_einsum_and_dot_product_implementations_agree():
  config = tiny_config()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 7, config.d_model)), jnp.float32)
  segments = jnp.asarray([[1, 1, 1, 1, 1, 0, 0], [1, 1, 2, 2, 2, 2, 0], [1] * 7])
  mask = segment_mask(segments, segments) & causal_mask(7)
  module, params = _mha_params(config, x, x, mask)
  out_einsum = module.apply({"params": params}, x, x, mask)
  fused = MultiHeadAttention(tiny_config(attention_impl="dot_product"), self_attention=False)
  out_fused = fused.apply({"params": params}, x, x, mask)
  np.testing.assert_allclose(out_einsum, out_fused, rtol=1e-5, atol=1e-5)


def test_segment_mask_keeps_segments_apart_and_hides_padding():
  segments = jnp.asarray([[1, 1, 2, 2, 0]])
  mask = np.asarray(segment_mask(segments, segments))[0, 0]
  expected = np.array([
      [1, 1, 0, 0, 0],
      [1, 1, 0, 0, 0],
      [0, 0, 1, 1, 0],
      [0, 0, 1, 1, 0],
      [1, 1, 1, 1, 0],  # A padding query sees every real key, so no softmax row is empty.
  ], bool)
  np.testing.assert_array_equal(mask, expected)


def test_causal_mask_is_lower_triangular():
  np.testing.assert_array_equal(causal_mask(4)[0, 0], np.tril(np.ones((4, 4), bool)))
