"""Where the cooldown goes (cooldown.py), on a clock the test moves: by steps, aimed at a time
budget, re-aimed without a jump in the rate, and kept as saved by a resumed run. The runs that
train with it are in tests/test_trainer.py."""

import jax
import pytest

from tiny_run import tiny_setup
from transformer_jax import cooldown as cooldown_module
from transformer_jax.cooldown import Cooldown
from transformer_jax.optim import cooldown_factor, find_cooldown


class Clock:
  """Stands for both of the module's clocks (time.monotonic and time.perf_counter)."""

  def __init__(self):
    self.now = 1000.0

  def monotonic(self):
    return self.now

  perf_counter = monotonic


@pytest.fixture
def clock(monkeypatch):
  clock = Clock()
  monkeypatch.setattr(cooldown_module, "time", clock)
  return clock


def plan_of(state):
  return [int(x) for x in jax.device_get(find_cooldown(state.opt_state).plan)]


def factor(plan, step):
  import jax.numpy as jnp
  return float(cooldown_factor(jnp.int32(step), jnp.array(plan, jnp.int32)))


def test_without_a_budget_the_cooldown_is_the_last_fraction_of_the_steps(clock):
  config, setup = tiny_setup(steps=100, cooldown_fraction=0.2)
  cooldown = Cooldown.for_run(config.train, deadline=float("inf"))
  state = cooldown.place(setup.init_state(0), 0)
  assert plan_of(state) == [80, 100, 0] and cooldown.end_step == 100
  assert cooldown.aim(state, 10) is state  # Nothing to aim at.
  assert Cooldown.for_run(tiny_setup(steps=100)[0].train, float("inf")) is None


def test_the_budgets_cooldown_starts_with_its_last_fraction_and_ends_with_the_budget(clock):
  """A 100 s budget whose last half is the cooldown, at 1 step a second: nothing before 50 s;
  at 50 s the rate starts falling from step 50 to reach zero at step 100 (the budget's end); when
  the pace doubles, the end moves out and the rate keeps the value it had reached."""
  config, setup = tiny_setup(steps=10**6, cooldown_fraction=0.5, time_budget_minutes=100 / 60)
  cooldown = Cooldown.for_run(config.train, deadline=clock.now + 100)
  state = cooldown.place(setup.init_state(0), 0)
  assert cooldown.end_step == 10**6  # By steps, until the budget says otherwise.
  for step in range(1, 50):
    clock.now += 1
    cooldown.mark(step)
    assert cooldown.aim(state, step) is state
  clock.now += 1
  cooldown.mark(50)
  state = cooldown.aim(state, 50)
  assert plan_of(state) == [50, 100, 1] and cooldown.end_step == 100
  assert int(jax.device_get(find_cooldown(state.opt_state).count)) == 50
  for step in range(51, 61):
    clock.now += 1
    cooldown.mark(step)
    assert cooldown.aim(state, step) is state  # Same pace, same plan.
  reached = factor([50, 100], 60)
  for step in range(61, 81):  # Twice as fast: the budget's end is further in steps.
    clock.now += 0.5
    cooldown.mark(step)
    before = plan_of(state)
    state = cooldown.aim(state, step)
    # Re-aimed from the rate reached: no jump (up to the rounding of the new first step).
    assert abs(factor(plan_of(state), step) - factor(before, step)) < 0.02, (before, plan_of(state))
  first, end, by_time = plan_of(state)
  assert by_time == 1 and end > 100 and cooldown.end_step == end
  assert factor([first, end], 80) < reached  # Still falling.


def test_a_resumed_run_keeps_the_budgets_plan_it_saved(clock):
  config, setup = tiny_setup(steps=10**6, cooldown_fraction=0.5, time_budget_minutes=1.0)
  cooldown = Cooldown.for_run(config.train, deadline=clock.now + 60)
  cooldown.plan = (30, 90, 1)
  saved = cooldown._with_plan(setup.init_state(0), 40)
  resumed = Cooldown.for_run(config.train, deadline=clock.now + 60)
  state = resumed.place(saved, 40)
  assert plan_of(state) == [30, 90, 1] and resumed.end_step == 90
  # A plan by steps is placed afresh (the config may have changed the steps).
  config.train.num_steps = 200
  by_steps = Cooldown.for_run(config.train, deadline=float("inf")).place(setup.init_state(0), 0)
  assert plan_of(by_steps) == [100, 200, 0]
