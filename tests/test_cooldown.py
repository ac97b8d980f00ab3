"""The learning-rate cooldown (cooldown.py and optim.scale_by_cooldown): where it goes, on a clock
the test moves (by steps, aimed at a time budget, re-aimed without a jump in the rate, kept as
saved by a resumed run), then in real runs: the rate it gives, a resume in the cooldown bit for
bit, a budget's cooldown ending with the budget, two processes agreeing on it."""

import jax
import numpy as np
import pytest

from tiny_run import (assert_bitwise_equal, load_dump, run_tiny, run_two_processes, tiny_batches,
                      tiny_run_config, tiny_setup)
from transformer_jax import checkpoints, trainer
from transformer_jax import cooldown as cooldown_module
from transformer_jax.cooldown import Cooldown
from transformer_jax.metrics import read_metrics
from transformer_jax.optim import cooldown_factor, find_cooldown, learning_rate_schedule


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


def test_the_cooldown_takes_the_learning_rate_to_zero_and_resumes_bit_for_bit(tmp_path):
  """cooldown_fraction 0.5 of 8 steps: the rate is multiplied by 1 up to step 4 (counted from 0),
  then (8 - step) / 4. A run preempted in the cooldown ends where the straight run does; one
  resumed from a checkpoint saved before the cooldown was switched on places it the same way."""
  run_tiny(tmp_path / "straight", 8, "--cooldown", "0.5", "--dump", str(tmp_path / "straight.npz"))
  result = run_tiny(tmp_path / "resumed", 8, "--cooldown", "0.5", "--sigterm_at", "6")
  assert "finished at step 6" in result.stdout
  run_tiny(tmp_path / "resumed", 8, "--cooldown", "0.5", "--dump", str(tmp_path / "resumed.npz"))
  straight = load_dump(tmp_path / "straight.npz")
  assert_bitwise_equal(straight, load_dump(tmp_path / "resumed.npz"))
  assert np.array_equal(straight[-1], [4, 8, 0])  # The plan is part of the state (its last leaf).
  schedule = learning_rate_schedule(tiny_run_config(8).train, 32)
  rates = {m["step"]: m["learning_rate"] for m in read_metrics(tmp_path / "straight", "train")}
  # Each logged rate is that of the window's last step, `step - 1` counted from 0.
  for step, factor in ((2, 1.0), (4, 1.0), (6, 0.75), (8, 0.25)):
    np.testing.assert_allclose(rates[step], float(schedule(step - 1)) * factor, rtol=1e-6)
  # Switched on at a resume: the plan is part of the optimiser state, so the run refuses with a
  # message that names the field, and changes nothing.
  run_tiny(tmp_path / "switched_on", 4)
  result = run_tiny(tmp_path / "switched_on", 8, "--cooldown", "0.5", check=False)
  assert result.returncode != 0
  assert "saved with train.cooldown_fraction=0.0" in result.stdout + result.stderr
  assert checkpoints.saved_steps(tmp_path / "switched_on") == [4]


def test_the_time_budgets_cooldown_ends_the_run_with_the_budget(tmp_path):
  """With a time budget, the cooldown starts when its last fraction begins and is aimed at its
  end at the recent steps per second; the run stops with the budget, the rate near zero."""
  config, setup = tiny_setup(steps=10**6, time_budget_minutes=0.25, cooldown_fraction=0.5,
                             checkpoint_every=10**6, log_every=5)
  batches = tiny_batches(config, setup)
  # Compiled first, so that the 15 s budget is for steps even where compiling takes most of it (a
  # busy CI machine): the budget counts compilation, the pace its cooldown is aimed with does not.
  setup.train_step(setup.init_state(0), setup.put_batch(batches[0]), jax.random.key(0))
  state = trainer.train(config, tmp_path, setup, batches)
  first, end, by_time = (int(x) for x in jax.device_get(find_cooldown(state.opt_state).plan))
  # The plan's end stopped the run, or the budget did a little earlier (a slower last stretch).
  assert by_time == 1 and first < end and int(state.step) <= end, (first, end, state.step)
  logged = read_metrics(tmp_path, "train")
  # Training ended with the 15 s budget (the metrics' clock and the budget's start together),
  # give or take a few steps.
  assert abs(60 * logged[-1]["minutes"] - 15.0) < 2.5, (logged[-1], first, end)
  # The cooldown's factor (the logged rate over the paper's): 1, then falling (re-aimed as the
  # pace changes, at another slope but never up) to near zero.
  schedule = learning_rate_schedule(config.train, config.model.d_model)
  factors = [m["learning_rate"] / float(schedule(m["step"] - 1)) for m in logged]
  assert abs(factors[0] - 1.0) < 1e-5 and factors[-1] < 0.2, factors
  assert all(b <= a * 1.01 for a, b in zip(factors, factors[1:])), factors
  restored, _ = checkpoints.restore(checkpoints.make_manager(tmp_path, config.train), setup)
  assert [int(x) for x in jax.device_get(find_cooldown(restored.opt_state).plan)] == [first, end, 1]
  if int(state.step) == end:  # Run again, the finished run has nothing left to train.
    again = trainer.train(config, tmp_path, setup, tiny_batches(config, setup))
    assert int(again.step) == end


@pytest.mark.slow  # About a minute; two processes equal one in the test above.
def test_two_processes_agree_on_the_time_budgets_cooldown(tmp_path):
  """Each process measures its own steps per second; the cooldown's end is process 0's estimate,
  so both place the same plan at the same step and stop together."""
  outputs = run_two_processes(tmp_path / "multi", 10**6, "--checkpoint_every", str(10**6),
                              "--budget_minutes", "0.5", "--cooldown", "0.5")
  finished = [next(line for line in o.splitlines() if line.startswith("finished")) for o in outputs]
  assert finished[0] == finished[1] and "cooldown [" in finished[0], finished
  first, end, by_time = map(int, finished[0].split("[")[1].rstrip("]").split())
  assert by_time == 1 and first < end < 10**6, finished
