"""The optimiser of section 5.3: Adam with the warm-up then inverse-square-root schedule, via optax.

lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), with beta1 = 0.9, beta2 = 0.98
and epsilon = 1e-9. Other schedules, gradient clipping, weight decay and gradient accumulation are
options; their defaults reproduce the paper. So is a cooldown (`train.cooldown_fraction`): the
learning rate falling linearly to zero over the run's last steps, an optax transformation after
Adam (`scale_by_cooldown`) whose plan lives in the optimiser state; `cooldown.py` places and aims
that plan from the host, since where a run with a time budget ends is known only while it runs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from transformer_jax.config import SCHEDULES

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


class CooldownState(NamedTuple):
  """`scale_by_cooldown`'s state: the steps counted (int32, set to the run's step whenever the
  plan is placed) and the plan, int32 (first step, end step, 1 if aimed at a time budget)."""

  count: jax.Array
  plan: jax.Array


def scale_by_cooldown() -> optax.GradientTransformation:
  """Multiplies the updates by `cooldown_factor(count, plan)` (Adam's update is proportional to
  its learning rate, so this scales the rate). A new state's plan is `NO_COOLDOWN`."""

  def init(params: Any) -> CooldownState:
    del params
    return CooldownState(jnp.zeros((), jnp.int32), jnp.array(NO_COOLDOWN, jnp.int32))

  def update(updates, state: CooldownState, params=None):
    del params
    factor = cooldown_factor(state.count, state.plan)
    updates = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
    return updates, CooldownState(state.count + 1, state.plan)

  return optax.GradientTransformation(init, update)


def find_cooldown(opt_state: Any) -> CooldownState | None:
  """The cooldown's state inside `make_optimizer`'s state, or None in a run without one."""
  if isinstance(opt_state, tuple) and opt_state and isinstance(opt_state[-1], CooldownState):
    return opt_state[-1]
  return None


def replace_cooldown(opt_state: tuple, cooldown: CooldownState) -> tuple:
  """`opt_state` (of a run with a cooldown) with its cooldown state replaced."""
  return (*opt_state[:-1], cooldown)


def learning_rate(train: ml_collections.ConfigDict, d_model: int):
  """`(step, opt_state) -> the learning rate of that step`, the cooldown's factor included."""
  schedule = learning_rate_schedule(train, d_model)
  accum = int(train.grad_accum_steps)

  def rate(step: jax.Array, opt_state: Any) -> jax.Array:
    value = schedule(step // accum)
    if (cooldown := find_cooldown(opt_state)) is not None:
      value = value * cooldown_factor(step, cooldown.plan)
    return value

  return rate


def make_optimizer(train: ml_collections.ConfigDict, d_model: int) -> optax.GradientTransformation:
  """Adam (or AdamW when `train.weight_decay` > 0) with the configured schedule, optional
  gradient clipping by global norm, optional gradient accumulation over `train.grad_accum_steps`
  batches (the schedule then counts real updates) and, with `train.cooldown_fraction` > 0, the
  cooldown (counting every batch, as the plan's steps do)."""
  schedule = learning_rate_schedule(train, d_model)
  if train.weight_decay > 0:
    adam = optax.adamw(schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                       weight_decay=train.weight_decay)
  else:
    adam = optax.adam(schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps)
  tx = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), adam) if train.grad_clip_norm > 0 else adam
  if train.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=train.grad_accum_steps)
  if cooldown_fraction(train) > 0:
    tx = optax.chain(tx, scale_by_cooldown())
  return tx
