"""Label-smoothed cross-entropy and accuracy (section 5.4), pure functions in float32.

Shapes: B batch, T target length, D d_model, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.constants import PAD_ID

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
