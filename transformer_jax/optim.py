"""The optimiser of section 5.3: Adam with the warm-up then inverse-square-root schedule, via optax.

lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), with beta1 = 0.9, beta2 = 0.98
and epsilon = 1e-9. Other schedules, gradient clipping, weight decay and gradient accumulation are
options; their defaults reproduce the paper. So is a cooldown (`train.cooldown_fraction`): the
learning rate falling linearly to zero over the run's last steps, which the trainer places when it
knows where the run will end (by the time budget) and the train step applies (`cooldown_factor`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

SCHEDULES = ("paper", "cosine", "constant")
# A cooldown plan is int32 (first step, end step, 1 if aimed at a time budget else 0); this one
# places it beyond any run.
NO_COOLDOWN = (np.iinfo(np.int32).max, np.iinfo(np.int32).max, 0)


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


def cooldown_fraction(train: ml_collections.ConfigDict) -> float:
  """`train.cooldown_fraction`, 0 in the configs of runs saved before it existed."""
  return float(train.get("cooldown_fraction", 0.0))


def cooldown_factor(step: jax.Array, plan: jax.Array) -> jax.Array:
  """What the learning rate is multiplied by at `step` (counted from 0) under `plan` = (first, end, _):
  1 up to `first`, then falling linearly to 0 at `end` ((end - step) / (end - first)).

  Linear decay to zero over the last 20% of a run matched or beat a cosine schedule of the same
  length in Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training
  Durations"); unlike cosine, it needs the run's length only once the cooldown begins.
  """
  first, end = plan[0], plan[1]
  span = jnp.maximum(end - first, 1).astype(jnp.float32)
  return jnp.clip((end - step).astype(jnp.float32) / span, 0.0, 1.0)


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
