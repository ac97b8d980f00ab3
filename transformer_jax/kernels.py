"""Speed only: forms of the model's products and loss that XLA runs faster, with the values and
gradients of the plain ones.

The paper's layers (`layers.py`) and loss (`losses.py`) are written as a reader expects them. A
train step on a CPU spends most of its time in a few products whose backward XLA:CPU gives to slow
kernels in autodiff's form, and a step on any backend holds the [B, T, V] logits and their
gradient, the largest arrays of the step. This module has the alternatives; the model takes them
through one switch, `config.cpu_kernels` (model.py's `feed_forward` and `steps.batch_metrics`).
The figures that justify each are in BENCHMARKS.md ("Train step").

- `weight_gradient`: a dense layer's weight gradient x^T g with the narrower operand transposed
  first on a CPU, so XLA:CPU gives the product to its fast kernels (YNNPACK).
- `dense_product` / `dense_dot_general`: `nn.Dense`'s product with that weight gradient
  (the feed-forward layers).
- `project_to_vocabulary`: the pre-softmax projection, whose weight gradient is computed as
  (x^T g)^T so XLA transposes the small activations rather than the logits' gradient.
- `vocabulary_metrics`: the loss over slices of the target length, never holding all the logits.

Shapes: B batch, L length, D d_model, V vocabulary.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax.losses import compute_metrics, token_weights

Array = jax.Array


def weight_gradient(x: Array, g: Array) -> Array:
  """x^T g for x [M, P] and g [M, Q]: a dense layer's weight gradient, [P, Q].

  XLA:CPU gives a product to its fast kernels (YNNPACK) only when the left operand is contracted
  over its last axis; x^T g as autodiff writes it contracts the first, and XLA then runs it in
  Eigen's kernels, 2 to 3 times slower on one core (BENCHMARKS.md). On a CPU the narrower
  operand is therefore transposed first (a copy of M x min(P, Q) floats), behind an optimization
  barrier so that XLA does not fold the transpose back into the product; elsewhere the product
  is left to the compiler, which takes transposed operands as they are.
  """

  def on_cpu(x, g):
    if x.shape[1] <= g.shape[1]:
      return lax.optimization_barrier(x.T) @ g
    return lax.optimization_barrier(lax.optimization_barrier(g.T) @ x).T

  return lax.platform_dependent(x, g, cpu=on_cpu, default=lambda x, g: x.T @ g)


@jax.custom_vjp
def project_to_vocabulary(x: Array, w: Array) -> Array:
  """[B, L, D] x [V, D] -> [B, L, V] float32 logits: x w^T.

  Autodiff's backward would compute the weight gradient as g^T x with the [B, L, V] logit gradient
  g as the left operand, and XLA on a CPU then writes g out transposed first: a copy of the largest
  array of the step (V x B x L floats). Written as (x^T g)^T, the same product leads XLA to
  transpose x instead (D x B x L floats, V / D times fewer). The weight gradient is
  `weight_gradient`'s, as for the feed-forward layers. The gradients are the same products, with g
  rounded to the compute dtype as in any mixed-precision backward.
  """
  return jnp.einsum("BLD,VD->BLV", x, w, preferred_element_type=jnp.float32)


def _project_forward(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
  return project_to_vocabulary(x, w), (x, w)


def _project_backward(saved: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, w = saved
  g = g.astype(x.dtype)
  # Products in the compute dtype (accumulated in float32 by the backends): XLA:CPU folds the
  # transpose into the product, and has no such product of bfloat16 operands with a float32 result.
  dx = jnp.einsum("BLV,VD->BLD", g, w)
  dw_t = weight_gradient(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))  # [D, V]
  return dx, dw_t.T.astype(w.dtype)


project_to_vocabulary.defvjp(_project_forward, _project_backward)


@jax.custom_vjp
def dense_product(x: Array, w: Array) -> Array:
  """[..., P] x [P, Q] -> [..., Q], whose backward computes the weight gradient with
  `weight_gradient`: the feed-forward layers' product (`FeedForward`, through
  `dense_dot_general`)."""
  return jnp.einsum("...p,pq->...q", x, w)


def _dense_forward(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
  return dense_product(x, w), (x, w)


def _dense_backward(saved: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, w = saved
  dx = jnp.einsum("...q,pq->...p", g, w)
  dw = weight_gradient(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))
  return dx, dw.astype(w.dtype)


dense_product.defvjp(_dense_forward, _dense_backward)


def dense_dot_general(x: Array, w: Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> Array:
  """`nn.Dense`'s `dot_general`: `dense_product` for the product Dense makes (x's last axis with
  the kernel's first), `lax.dot_general` for anything else. The parameters stay Dense's own."""
  if (dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())) and w.ndim == 2
      and precision is None and preferred_element_type is None):
    return dense_product(x, w)
  return lax.dot_general(x, w, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)


def vocabulary_metrics(x: Array, table: Array, targets: Array, label_smoothing: float, *,
                       bias: Array | None = None, weights: Array | None = None,
                       chunks: int = 1, cpu_backward: bool = True) -> dict[str, Array]:
  """`compute_metrics` of the logits x table^T + bias, without the [B, T, V] logits.

  The pre-softmax projection and the loss run over `chunks` slices of the target length, one at a
  time, so only a [B, T / chunks, V] block of logits exists at once; under differentiation each
  block's gradients (of x, of the table and of the bias) are computed as soon as its loss is, and
  the block is dropped. That is the same arithmetic as the logits followed by `compute_metrics`,
  less memory traffic: a block of a quarter of the logits stays in a CPU's cache where all of them
  would not, and a GPU or TPU keeps a quarter of the memory the logits would take.

  Only `loss` carries a gradient; `nll`, `correct` and `tokens` are metrics (their gradient is
  zero, as if stopped).

  Args:
    x: [B, T, D] the decoder's output, in the compute dtype.
    table: [V, D] the (shared) embedding matrix, in the compute dtype.
    targets: [B, T] int token ids.
    label_smoothing: epsilon_ls in [0, 1).
    bias: [V] logits bias, or None.
    weights: [B, T] token weights; default 1 on real tokens and 0 on padding.
    chunks: slices of the target length (more than T counts as T; T need not be a multiple: the
      last slice is padded with weight-0 positions).
    cpu_backward: the projection's backward of `project_to_vocabulary`; False: autodiff's.
  """
  weights = token_weights(targets) if weights is None else weights.astype(jnp.float32)
  batch, length, _ = x.shape
  chunks = max(1, min(int(chunks), length))
  size = -(-length // chunks)
  pad = chunks * size - length
  if pad:
    x, targets, weights = (jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
                           for a in (x, targets, weights))
  # [B, T, ...] -> [chunks, B, T / chunks, ...]: the batch axis (and its sharding) stays whole.
  split = lambda a: jnp.moveaxis(a.reshape(batch, chunks, size, *a.shape[2:]), 1, 0)
  bias = jnp.zeros(table.shape[:1], jnp.float32) if bias is None else bias
  loss, nll, correct = _chunked_metrics(split(x), table, bias, split(targets), split(weights),
                                        float(label_smoothing), bool(cpu_backward))
  return {"loss": loss, "nll": lax.stop_gradient(nll), "correct": lax.stop_gradient(correct),
          "tokens": jnp.sum(weights)}


def _plain_projection(x: Array, w: Array) -> Array:
  return jnp.einsum("BLD,VD->BLV", x, w, preferred_element_type=jnp.float32)


def _block_metrics(x: Array, table: Array, bias: Array, targets: Array, weights: Array,
                   label_smoothing: float, cpu_backward: bool) -> tuple[Array, tuple[Array, Array]]:
  """(loss, (nll, correct)) of one [B, C] block of positions, through its logits."""
  project = project_to_vocabulary if cpu_backward else _plain_projection
  logits = project(x, table) + bias.astype(jnp.float32)
  logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
  metrics = compute_metrics(logits, targets, label_smoothing, weights)
  return metrics["loss"], (metrics["nll"], metrics["correct"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _chunked_metrics(xs, table, bias, targets, weights, label_smoothing, cpu_backward):
  """Summed (loss, nll, correct) over the blocks of `xs` [chunks, B, C, D]."""

  def body(totals, block):
    loss, (nll, correct) = _block_metrics(*block[:1], table, bias, *block[1:], label_smoothing,
                                          cpu_backward)
    return jax.tree.map(jnp.add, totals, (loss, nll, correct)), None

  zero = jnp.zeros((), jnp.float32)
  return lax.scan(body, (zero, zero, zero), (xs, targets, weights))[0]


def _chunked_metrics_forward(xs, table, bias, targets, weights, label_smoothing, cpu_backward):
  """The metrics and, block by block, the loss's gradients (for a cotangent of 1)."""

  def body(carry, block):
    totals, table_grad_t, bias_grad = carry
    x, block_targets, block_weights = block
    loss, pullback, (nll, correct) = jax.vjp(
        lambda x, table, bias: _block_metrics(x, table, bias, block_targets, block_weights,
                                              label_smoothing, cpu_backward),
        x, table, bias, has_aux=True)
    # The logits' gradient reaches x and the table through `project_to_vocabulary`'s backward; the
    # table's gradient is summed over the blocks transposed, [D, V], the layout XLA produces it in.
    dx, dtable, dbias = pullback(jnp.ones((), jnp.float32))
    totals = jax.tree.map(jnp.add, totals, (loss, nll, correct))
    return (totals, table_grad_t + dtable.T.astype(jnp.float32), bias_grad + dbias), dx

  zero = jnp.zeros((), jnp.float32)
  init = ((zero, zero, zero), jnp.zeros(table.shape[::-1], jnp.float32), jnp.zeros_like(bias))
  (totals, table_grad_t, bias_grad), dxs = lax.scan(body, init, (xs, targets, weights))
  return totals, (dxs, table_grad_t.T.astype(table.dtype), bias_grad)


def _chunked_metrics_backward(label_smoothing, cpu_backward, saved, cotangents):
  del label_smoothing, cpu_backward
  dxs, dtable, dbias = saved
  g = cotangents[0]  # The loss's; nll and correct are metrics (stopped in vocabulary_metrics).
  scale = lambda a: (g * a.astype(jnp.float32)).astype(a.dtype)
  return scale(dxs), scale(dtable), scale(dbias), None, None


_chunked_metrics.defvjp(_chunked_metrics_forward, _chunked_metrics_backward)
