"""Where the learning-rate cooldown goes, decided on the host (a departure from the paper, asked
for by `train.cooldown_fraction` > 0; the quick start's config uses it).

The cooldown itself is a schedule (`optim.scale_by_cooldown`: the rate falls linearly to zero from
a first step to an end step). A run by steps knows both at its start: the last
`cooldown_fraction` of `num_steps`. A run with a time budget does not: it starts the cooldown
when the budget's last fraction begins and aims its end at the budget's end, at the pace of the
recent steps, re-aimed as the pace changes. The plan is part of the optimiser state, so a run
resumed from a checkpoint finishes the plan it saved.
"""

from __future__ import annotations

import collections
import logging
import math
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from transformer_jax.optim import NO_COOLDOWN, CooldownState, cooldown_fraction, find_cooldown, replace_cooldown

log = logging.getLogger(__name__)

Plan = tuple[int, int, int]  # (first step, end step, 1 if aimed at a time budget else 0)


class Cooldown:
  """The host's side of a run's cooldown: `place` it when training starts, `aim` it at every
  point where the processes synchronise; `end_step` is where it takes the rate to zero."""

  def __init__(self, train: ml_collections.ConfigDict, deadline: float):
    """`deadline`: the `time.monotonic()` at which the time budget ends (inf: none)."""
    self.fraction = cooldown_fraction(train)
    self.num_steps = int(train.num_steps)
    budget_s = 60.0 * float(train.time_budget_minutes)
    self.starts_at = deadline - budget_s * self.fraction if budget_s > 0 else math.inf
    self.deadline = deadline
    self.plan: Plan = NO_COOLDOWN
    self._marks: collections.deque = collections.deque(maxlen=30)  # (step, time): the pace.

  @classmethod
  def for_run(cls, train: ml_collections.ConfigDict, deadline: float) -> Cooldown | None:
    """The run's cooldown, or None when it has none (`train.cooldown_fraction` is 0)."""
    return cls(train, deadline) if cooldown_fraction(train) > 0 else None

  @property
  def end_step(self) -> int:
    return self.plan[1]

  def place(self, state, step: int):
    """The state with its plan placed at the start (or resume) of training, at `step`.

    A plan aimed at a time budget that has begun is kept as saved (a resumed run finishes it bit
    for bit); otherwise the plan covers the last `cooldown_fraction` of `num_steps` as configured
    now (a time budget may bring it forward later)."""
    saved = tuple(int(x) for x in _host_copy(_cooldown_of(state).plan))
    if saved[2] and saved[0] <= step:
      if step >= saved[1]:
        log.info("This run's cooldown ended at step %d with its time budget; there is nothing left "
                 "to train (to train on from here, set train.cooldown_fraction=0).", saved[1])
      self.plan = saved
    else:
      self.plan = (round((1.0 - self.fraction) * self.num_steps), self.num_steps, 0)
    return self._with_plan(state, step)

  def mark(self, step: int) -> None:
    """Notes that `step` ended now (after waiting for it): the pace the budget's end is aimed at."""
    self._marks.append((step, time.perf_counter()))

  def aim(self, state, step: int):
    """At a point where every process has reached `step`: once the budget's last fraction has
    begun, aims the cooldown's end at the budget's end at the pace of the last few hundred steps
    (validation and checkpoints included). The cooldown starts now unless the one planned by
    steps ends the run first; once started, it is re-aimed each time, so that a machine that slows
    down or speeds up still reaches rate 0 with the budget: the rate falls from where it is at
    another slope and never jumps. Process 0's clock and estimate are every process's.

    Returns the state, with a new plan if it changed."""
    if math.isinf(self.starts_at):  # No time budget: the plan by steps is the plan.
      return state
    due, end = self._estimate(step)
    if not due:
      return state
    aimed = bool(self.plan[2])  # Placed by this budget already (a resumed plan ends before that).
    if not aimed and (end >= self.plan[1] or self.plan[0] <= step):
      return state  # The cooldown by steps ends the run first, or has begun.
    if not aimed:
      log.info("Cooldown: the learning rate falls linearly to 0 from step %d to about step %d, where "
               "the time budget ends.", step, end)
      first = step
    elif end == self.plan[1]:
      return state
    else:
      reached = (self.plan[1] - step) / (self.plan[1] - self.plan[0])
      first = end - round((end - step) / max(reached, 1e-6))
    self.plan = (first, end, 1)
    return self._with_plan(state, step)

  def _estimate(self, step: int) -> tuple[bool, int]:
    """(whether the budget's cooldown is due, the step at which the budget ends at the recent
    pace), process 0's for every process."""
    now = time.monotonic()
    due, end = False, self.num_steps
    if len(self._marks) > 1 and self._marks[-1][0] > self._marks[0][0]:
      (s0, t0), (s1, t1) = self._marks[0], self._marks[-1]
      end = min(end, step + max(1, round((s1 - s0) / (t1 - t0) * max(0.0, self.deadline - now))))
      due = now >= self.starts_at
    local = np.array([due, end], np.int64)
    if jax.process_count() > 1:
      local = np.asarray(multihost_utils.broadcast_one_to_all(local))
    return bool(local[0]), int(local[1])

  def _with_plan(self, state, step: int):
    """`state` with this plan and the cooldown's step count at `step`, replicated like the old."""
    old = _cooldown_of(state)
    plan = np.array(self.plan, np.int32)
    count = np.array(step, np.int32)
    new = CooldownState(
        count=jax.make_array_from_callback(count.shape, old.count.sharding, lambda i: count[i]),
        plan=jax.make_array_from_callback(plan.shape, old.plan.sharding, lambda i: plan[i]))
    return state.replace(opt_state=replace_cooldown(state.opt_state, new))


def _cooldown_of(state) -> CooldownState:
  cooldown = find_cooldown(state.opt_state)
  assert cooldown is not None, "the run's optimiser has no cooldown"
  return cooldown


def _host_copy(array: jax.Array) -> np.ndarray:
  """A replicated array's value (any local copy will do)."""
  return np.asarray(array.addressable_data(0))
