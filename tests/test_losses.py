"""Label-smoothed cross-entropy against a hand computation (section 5.4)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.losses import compute_metrics, label_smoothed_cross_entropy


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
