"""Positional encodings, the shared embedding and the feed-forward network (sections 3.3-3.5)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from transformer_jax.layers import (Dropout, FeedForward, PositionalEncoding, SharedEmbedding,
                                    sinusoidal_encoding)


def test_sinusoidal_encoding_equals_the_papers_formula():
  d_model, length = 16, 50
  pe = np.asarray(sinusoidal_encoding(jnp.arange(length)[None], d_model))[0]
  for pos in range(length):
    for i in range(d_model // 2):
      angle = pos / 10000 ** (2 * i / d_model)
      assert math.isclose(pe[pos, 2 * i], math.sin(angle), abs_tol=1e-5)
      assert math.isclose(pe[pos, 2 * i + 1], math.cos(angle), abs_tol=1e-5)


def test_sinusoidal_encoding_has_no_length_limit_and_follows_given_positions():
  positions = jnp.asarray([[0, 1, 2, 0, 1, 5000]])
  pe = sinusoidal_encoding(positions, 8)
  np.testing.assert_allclose(pe[0, 3], pe[0, 0])
  np.testing.assert_allclose(pe[0, 4], pe[0, 1])
  assert np.all(np.isfinite(pe))


def test_learned_positions_are_a_table_lookup():
  config = tiny_config(positional_encoding="learned")
  module = PositionalEncoding(config)
  x = jnp.zeros((1, 4, config.d_model))
  positions = jnp.asarray([[0, 3, 3, 1]])
  params = nn.meta.unbox(module.init(jax.random.key(0), x, positions))["params"]
  table = np.asarray(params["position_embedding"])
  assert table.shape == (config.max_len, config.d_model)
  np.testing.assert_allclose(module.apply({"params": params}, x, positions)[0], table[[0, 3, 3, 1]])


def test_shared_embedding_scales_by_sqrt_d_model_and_attends_with_the_same_matrix():
  config = tiny_config()
  module = SharedEmbedding(config)
  tokens = jnp.asarray([[4, 5, 6]])
  params = nn.meta.unbox(module.init(jax.random.key(0), tokens))["params"]
  matrix = np.asarray(params["embedding"])
  x = module.apply({"params": params}, tokens)
  np.testing.assert_allclose(x[0], matrix[[4, 5, 6]] * math.sqrt(config.d_model), rtol=1e-6)
  h = np.random.default_rng(0).normal(size=(1, 3, config.d_model)).astype(np.float32)
  logits = module.apply({"params": params}, jnp.asarray(h), method=SharedEmbedding.attend)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits[0], h[0] @ matrix.T, rtol=1e-5, atol=1e-5)


def test_feed_forward_is_relu_between_two_linear_maps():
  config = tiny_config()
  module = FeedForward(config)
  x = np.random.default_rng(0).normal(size=(2, 3, config.d_model)).astype(np.float32)
  params = nn.meta.unbox(module.init(jax.random.key(0), jnp.asarray(x)))["params"]
  p = jax.tree.map(np.asarray, params)
  expected = np.maximum(0, x @ p["wi"]["kernel"] + p["wi"]["bias"]) @ p["wo"]["kernel"] + p["wo"]["bias"]
  np.testing.assert_allclose(module.apply({"params": params}, jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [512, 7])
@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_dropout_keeps_units_independently_at_the_rate_and_keeps_the_mean(rate, width):
  x = jnp.ones((1 << 21) // width * width).reshape(-1, width)
  y = Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  kept = np.asarray(y != 0)
  n = kept.size
  sigma = math.sqrt(rate * (1 - rate) / n)
  assert abs(kept.mean() - (1 - rate)) < 5 * sigma
  assert abs(float(y.mean()) - 1.0) < 5 * sigma / (1 - rate)  # Inverted: the mean is kept.
  # Neighbours (the two halves of one random word when the width is even) are independent.
  both = (kept[:, 0::2][:, :width // 2] & kept[:, 1::2][:, :width // 2]).mean()
  assert abs(both - (1 - rate) ** 2) < 5 * math.sqrt((1 - rate) ** 2 / (n / 2))


def test_dropout_in_bfloat16_keeps_the_mean():
  # Kept units are scaled by 1/k in float32, then rounded: in bfloat16 the scale itself would be
  # 1.109375 instead of 1.11111, 0.16% low on every kept unit.
  x = jax.random.uniform(jax.random.key(1), (200_000,), minval=1.0, maxval=2.0).astype(jnp.bfloat16)
  y = Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  assert y.dtype == jnp.bfloat16
  kept = np.asarray(y) != 0
  keep = round(0.9 * 2**16) / 2**16
  ratio = np.asarray(y, np.float64)[kept].sum() / np.asarray(x, np.float64)[kept].sum()
  assert abs(ratio * keep - 1.0) < 2e-4, ratio * keep


def test_dropout_is_keyed_deterministic_when_asked_and_keeps_the_dtype():
  x = jnp.ones((4, 6, 8), jnp.bfloat16)
  drop = lambda seed, **kw: Dropout(0.5).apply({}, x, rngs={"dropout": jax.random.key(seed)}, **kw)
  assert drop(0, deterministic=True) is x
  assert drop(0, deterministic=False).dtype == jnp.bfloat16
  np.testing.assert_array_equal(drop(1, deterministic=False), drop(1, deterministic=False))
  assert not np.array_equal(drop(1, deterministic=False), drop(2, deterministic=False))
  assert set(np.unique(np.asarray(drop(1, deterministic=False), np.float32))) <= {0.0, 2.0}
  assert Dropout(0.0).apply({}, x, deterministic=False) is x  # No rng needed at rate 0.
