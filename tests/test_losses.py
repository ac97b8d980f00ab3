"""Label-smoothed cross-entropy against a hand computation (section 5.4), and the same metrics
computed without the logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.losses import compute_metrics, label_smoothed_cross_entropy, vocabulary_metrics


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.2])
def test_label_smoothed_loss_matches_a_hand_computation(eps):
  logits = np.array([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4]]], np.float32)
  targets = np.array([[0, 3]])
  loss = np.asarray(label_smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), eps))
  V = 4
  for t in range(2):
    log_p = logits[0, t] - math.log(np.exp(logits[0, t]).sum())
    q = np.full(V, eps / (V - 1))
    q[targets[0, t]] = 1 - eps
    expected = -(q * log_p).sum() + (q[q > 0] * np.log(q[q > 0])).sum()  # KL(q || p)
    assert math.isclose(loss[0, t], expected, rel_tol=1e-5)


def test_predicting_the_smoothed_distribution_exactly_costs_nothing():
  eps, V = 0.1, 5
  q = np.full(V, eps / (V - 1))
  q[2] = 1 - eps
  loss = label_smoothed_cross_entropy(jnp.log(jnp.asarray(q))[None, None], jnp.asarray([[2]]), eps)
  assert abs(float(loss[0, 0])) < 1e-6


def test_metrics_ignore_padding():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 7)), jnp.float32)
  targets = jnp.asarray([[4, 5, 0], [6, 0, 0]])
  metrics = compute_metrics(logits, targets, 0.1)
  assert float(metrics["tokens"]) == 3
  per_token = label_smoothed_cross_entropy(logits, targets, 0.1)
  assert math.isclose(float(metrics["loss"]), float(per_token[0, 0] + per_token[0, 1] + per_token[1, 0]), rel_tol=1e-6)


def _projection_case(dtype, with_bias, length=7):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, length, 8)), dtype)
  table = jnp.asarray(rng.normal(size=(13, 8)) * 0.5, dtype)
  bias = jnp.asarray(rng.normal(size=(13,)), jnp.float32) if with_bias else None
  targets = jnp.asarray(rng.integers(1, 13, size=(3, length)))
  targets = targets.at[0, -2:].set(0).at[2, 3:].set(0)  # Padding: weight 0.
  return x, table, bias, targets


def _plain_metrics(x, table, bias, targets, eps):
  logits = jnp.einsum("BLD,VD->BLV", x, table, preferred_element_type=jnp.float32)
  return compute_metrics(logits if bias is None else logits + bias, targets, eps)


@pytest.mark.parametrize("chunks", [1, 3, 7, 50])  # 3 does not divide the 7 positions.
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_metrics_without_the_logits_equal_the_metrics_of_the_logits_and_so_do_the_gradients(
    chunks, with_bias, eps):
  x, table, bias, targets = _projection_case(jnp.float32, with_bias)
  ours = jax.jit(lambda x, t, b: vocabulary_metrics(x, t, targets, eps, bias=b, chunks=chunks))
  expected = _plain_metrics(x, table, bias, targets, eps)
  got = ours(x, table, bias)
  for key in ("loss", "nll", "correct", "tokens"):
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, err_msg=key)

  def gradients(metrics):  # The train step's loss: the mean over real tokens.
    loss = lambda x, t, b: (lambda m: m["loss"] / m["tokens"])(metrics(x, t, b))
    return jax.jit(jax.grad(loss, argnums=(0, 1) if bias is None else (0, 1, 2)))(x, table, bias)

  got = gradients(lambda x, t, b: vocabulary_metrics(x, t, targets, eps, bias=b, chunks=chunks))
  expected = gradients(lambda x, t, b: _plain_metrics(x, t, b, targets, eps))
  for name, a, b in zip(("x", "table", "bias"), got, expected):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
  # Padding positions get no gradient, whatever chunk they fall in.
  assert not np.any(np.asarray(got[0])[2, 3:])


def test_only_the_loss_of_the_metrics_without_the_logits_has_a_gradient():
  x, table, _, targets = _projection_case(jnp.float32, False)
  nll = lambda x: vocabulary_metrics(x, table, targets, 0.1, chunks=2)["nll"]
  assert not np.any(np.asarray(jax.grad(nll)(x)))


def test_bfloat16_metrics_without_the_logits_compile_and_follow_float32():
  x, table, bias, targets = _projection_case(jnp.bfloat16, True, length=16)
  loss = lambda x, t: vocabulary_metrics(x, t, targets, 0.1, bias=bias, chunks=4)["loss"]
  dx, dtable = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, table)  # Compiles on XLA:CPU.
  assert dx.dtype == dtable.dtype == jnp.bfloat16
  x32, t32 = x.astype(jnp.float32), table.astype(jnp.float32)
  plain = lambda x, t: _plain_metrics(x, t, bias, targets, 0.1)["loss"]
  ex, et = jax.grad(plain, argnums=(0, 1))(x32, t32)
  for a, b in ((dx, ex), (dtable, et)):
    a, b = np.float32(a).ravel(), np.asarray(b).ravel()
    assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999
