"""The speed kernels (kernels.py) against the plain products and loss they stand for: the same
values and gradients, compiled as in a train step; and the one switch that turns them off."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from transformer_jax.kernels import dense_product, project_to_vocabulary, vocabulary_metrics
from transformer_jax.losses import compute_metrics
from transformer_jax.model import Transformer


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vocabulary_projection_has_the_gradients_of_the_plain_product(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), dtype)
  w = jnp.asarray(rng.normal(size=(11, 8)), dtype)
  weights = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)  # A loss that weighs every logit.
  plain = lambda x, w: jnp.einsum("BLD,VD->BLV", x, w, preferred_element_type=jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(jnp.tanh(f(x, w)) * weights)
  gradients = lambda f: jax.jit(jax.grad(loss(f), (0, 1)))(x, w)  # Compiled, as in a train step.
  ours, expected = gradients(project_to_vocabulary), gradients(plain)
  np.testing.assert_array_equal(project_to_vocabulary(x, w), plain(x, w))
  tolerance = 1e-6 if dtype == jnp.float32 else 2e-2  # bfloat16: the logit gradient is rounded first.
  for a, b in zip(ours, expected):
    assert a.dtype == b.dtype == dtype
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("widths", [(8, 24), (24, 8)])  # Either operand the narrower one.
def test_dense_product_has_the_gradients_of_the_plain_product(dtype, widths):
  p, q = widths
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, p)), dtype)
  w = jnp.asarray(rng.normal(size=(p, q)), dtype)
  weights = jnp.asarray(rng.normal(size=(2, 5, q)), dtype)
  plain = lambda x, w: x @ w
  loss = lambda f: lambda x, w: jnp.sum(jnp.tanh(f(x, w).astype(jnp.float32)) * weights)
  gradients = lambda f: jax.jit(jax.grad(loss(f), (0, 1)))(x, w)  # Compiled, as in a train step.
  np.testing.assert_array_equal(dense_product(x, w), plain(x, w))
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(gradients(dense_product), gradients(plain)):
    assert a.dtype == b.dtype == dtype
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tolerance, atol=tolerance)


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


@pytest.mark.parametrize("chunks", [1, 3])
def test_the_switch_gives_the_same_training_metrics_and_gradients(chunks):
  """`model.cpu_kernels` on and off: the train step's metrics (`steps.batch_metrics`) and the
  gradients of its loss agree, and off, no custom backward is left in the step."""
  from transformer_jax.steps import batch_metrics
  src = jnp.asarray(np.random.default_rng(0).integers(4, 64, size=(2, 9)))
  tgt = jnp.asarray(np.random.default_rng(1).integers(4, 64, size=(2, 8))).at[1, 6:].set(0)
  batch = {"src": src, "tgt": tgt}
  on, off = (Transformer(tiny_config(cpu_kernels=flag)) for flag in (True, False))
  params = nn.meta.unbox(on.init(jax.random.key(0), src, tgt))["params"]

  def loss_and_grads(model):
    loss = lambda p: (lambda m: (m["loss"] / m["tokens"], m))(
        batch_metrics(model, p, batch, 0.1, chunks, train=False))
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, got), got_grads = loss_and_grads(on)
  (_, expected), expected_grads = loss_and_grads(off)
  for key in ("loss", "nll", "correct", "tokens"):
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  if chunks == 1:
    lowered = jax.jit(jax.grad(lambda p: batch_metrics(off, p, batch, 0.1, 1, train=False)["loss"]))
    assert "custom_vjp" not in str(jax.make_jaxpr(lowered)(params))
