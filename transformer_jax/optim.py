"""The optimiser of section 5.3: Adam with the warm-up then inverse-square-root schedule, via optax.

lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), with beta1 = 0.9, beta2 = 0.98
and epsilon = 1e-9. Other schedules, gradient clipping, weight decay and gradient accumulation are
options; their defaults reproduce the paper.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("paper", "cosine", "constant")


def paper_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
  """The learning rate of section 5.3 as an optax schedule.

  optax counts updates from 0; the paper's step number is that count plus one, so the first
  update uses step = 1 (a learning rate of d_model^-0.5 * warmup_steps^-1.5, not zero).
  """
  def schedule(count):
    step = jnp.asarray(count, jnp.float32) + 1.0
    return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)
  return schedule


def learning_rate_schedule(train: ml_collections.ConfigDict, d_model: int) -> optax.Schedule:
  """The schedule named by `train.schedule`: "paper", "cosine" or "constant" (both after warm-up)."""
  if train.schedule == "paper":
    return paper_schedule(d_model, train.warmup_steps, train.learning_rate_scale)
  if train.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, train.learning_rate, train.warmup_steps, max(train.num_steps, train.warmup_steps + 1))
  if train.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, train.learning_rate, train.warmup_steps),
         optax.constant_schedule(train.learning_rate)], [train.warmup_steps])
  raise ValueError(f"train.schedule={train.schedule!r} is not one of {', '.join(map(repr, SCHEDULES))}")


def make_optimizer(train: ml_collections.ConfigDict, d_model: int) -> optax.GradientTransformation:
  """Adam (or AdamW when `train.weight_decay` > 0) with the configured schedule, optional
  gradient clipping by global norm, and optional gradient accumulation over
  `train.grad_accum_steps` batches (the schedule then counts real updates)."""
  schedule = learning_rate_schedule(train, d_model)
  if train.weight_decay > 0:
    adam = optax.adamw(schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                       weight_decay=train.weight_decay)
  else:
    adam = optax.adam(schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps)
  tx = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), adam) if train.grad_clip_norm > 0 else adam
  if train.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=train.grad_accum_steps)
  return tx
