"""Label-smoothed cross-entropy and accuracy (section 5.4), pure functions in float32.

Shapes: B batch, T target length, D d_model, V vocabulary.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax.constants import PAD_ID
from transformer_jax.layers import project_to_vocabulary

Array = jax.Array


def label_smoothed_cross_entropy(logits: Array, targets: Array, label_smoothing: float) -> Array:
  """Per-token cross-entropy against a smoothed target distribution.

  The target distribution puts 1 - label_smoothing on the correct token and spreads
  label_smoothing evenly over the other V - 1 tokens (epsilon_ls = 0.1 in the paper). The entropy
  of that distribution is subtracted, so a model that predicts it exactly has loss 0.

  Args:
    logits: [B, T, V] (any float dtype; computed in float32).
    targets: [B, T] int token ids.
    label_smoothing: epsilon_ls in [0, 1).

  Returns:
    [B, T] float32 losses, padding included (weight them with `targets != PAD_ID`).
  """
  vocab_size = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  # log p(v) = logit(v) - logsumexp(logits), so neither term below needs the [B, T, V] log-probs:
  # sum_v q(v) log p(v), with q `low` everywhere plus (confidence - low) on the target, is
  # (confidence - low) * log p(target) + low * (sum_v logit(v) - V * logsumexp).
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_log_prob = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab_size - 1)
  cross = (confidence - low) * target_log_prob
  entropy = -confidence * jnp.log(confidence)
  if label_smoothing > 0:
    cross += low * (jnp.sum(logits, axis=-1) - vocab_size * log_z)
    entropy -= (vocab_size - 1) * low * jnp.log(low)
  return -cross - entropy


def token_weights(targets: Array) -> Array:
  """1.0 on real target tokens, 0.0 on padding: [B, T] float32."""
  return (targets != PAD_ID).astype(jnp.float32)


def compute_metrics(logits: Array, targets: Array, label_smoothing: float,
                    weights: Array | None = None) -> dict[str, Array]:
  """Summed (not averaged) metrics of a batch, so they add up across batches and devices.

  Returns:
    `loss` (label-smoothed), `nll` (plain cross-entropy, for perplexity), `correct` (tokens whose
    target has the highest logit; a tie, which float logits make vanishingly rare, counts as a hit)
    and `tokens` (the weight total), each a float32 scalar.
  """
  weights = token_weights(targets) if weights is None else weights
  loss = label_smoothed_cross_entropy(logits, targets, label_smoothing)
  nll = label_smoothed_cross_entropy(logits, targets, 0.0) if label_smoothing else loss
  # The target's logit against the maximum rather than argmax against the target: logsumexp takes
  # the maximum anyway, whereas argmax is one more pass over the [B, T, V] logits.
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  return {
      "loss": jnp.sum(loss * weights),
      "nll": jnp.sum(nll * weights),
      "correct": jnp.sum(correct * weights),
      "tokens": jnp.sum(weights),
  }


def vocabulary_metrics(x: Array, table: Array, targets: Array, label_smoothing: float, *,
                       bias: Array | None = None, weights: Array | None = None,
                       chunks: int = 1) -> dict[str, Array]:
  """`compute_metrics` of the logits x table^T + bias, without the [B, T, V] logits.

  The pre-softmax projection and the loss run over `chunks` slices of the target length, one at a
  time, so only a [B, T / chunks, V] block of logits exists at once; under differentiation each
  block's gradients (of x, of the table and of the bias) are computed as soon as its loss is, and
  the block is dropped. That is the same arithmetic as the logits followed by `compute_metrics`,
  less memory traffic: the quick start's logits and their gradient are 131 MB each, and a block of
  a quarter of them stays in a CPU's cache (its step is 1.1x faster, BENCHMARKS.md); a GPU or TPU
  keeps a quarter of the memory the logits would take.

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
                                        float(label_smoothing))
  return {"loss": loss, "nll": lax.stop_gradient(nll), "correct": lax.stop_gradient(correct),
          "tokens": jnp.sum(weights)}


def _block_metrics(x: Array, table: Array, bias: Array, targets: Array, weights: Array,
                   label_smoothing: float) -> tuple[Array, tuple[Array, Array]]:
  """(loss, (nll, correct)) of one [B, C] block of positions, through its logits."""
  logits = project_to_vocabulary(x, table) + bias.astype(jnp.float32)
  logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
  metrics = compute_metrics(logits, targets, label_smoothing, weights)
  return metrics["loss"], (metrics["nll"], metrics["correct"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunked_metrics(xs, table, bias, targets, weights, label_smoothing):
  """Summed (loss, nll, correct) over the blocks of `xs` [chunks, B, C, D]."""

  def body(totals, block):
    loss, (nll, correct) = _block_metrics(*block[:1], table, bias, *block[1:], label_smoothing)
    return jax.tree.map(jnp.add, totals, (loss, nll, correct)), None

  zero = jnp.zeros((), jnp.float32)
  return lax.scan(body, (zero, zero, zero), (xs, targets, weights))[0]


def _chunked_metrics_forward(xs, table, bias, targets, weights, label_smoothing):
  """The metrics and, block by block, the loss's gradients (for a cotangent of 1)."""

  def body(carry, block):
    totals, table_grad_t, bias_grad = carry
    x, block_targets, block_weights = block
    loss, pullback, (nll, correct) = jax.vjp(
        lambda x, table, bias: _block_metrics(x, table, bias, block_targets, block_weights,
                                              label_smoothing), x, table, bias, has_aux=True)
    # The logits' gradient reaches x and the table through `project_to_vocabulary`'s backward; the
    # table's gradient is summed over the blocks transposed, [D, V], the layout XLA produces it in.
    dx, dtable, dbias = pullback(jnp.ones((), jnp.float32))
    totals = jax.tree.map(jnp.add, totals, (loss, nll, correct))
    return (totals, table_grad_t + dtable.T.astype(jnp.float32), bias_grad + dbias), dx

  zero = jnp.zeros((), jnp.float32)
  init = ((zero, zero, zero), jnp.zeros(table.shape[::-1], jnp.float32), jnp.zeros_like(bias))
  (totals, table_grad_t, bias_grad), dxs = lax.scan(body, init, (xs, targets, weights))
  return totals, (dxs, table_grad_t.T.astype(table.dtype), bias_grad)


def _chunked_metrics_backward(label_smoothing, saved, cotangents):
  del label_smoothing
  dxs, dtable, dbias = saved
  g = cotangents[0]  # The loss's; nll and correct are metrics (stopped in vocabulary_metrics).
  scale = lambda a: (g * a.astype(jnp.float32)).astype(a.dtype)
  return scale(dxs), scale(dtable), scale(dbias), None, None


_chunked_metrics.defvjp(_chunked_metrics_forward, _chunked_metrics_backward)
