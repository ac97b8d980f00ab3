"""The optimiser (section 5.3): the paper's schedule, and the cooldown as a schedule transformation."""

import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import base_config
from transformer_jax.optim import (NO_COOLDOWN, CooldownState, cooldown_factor, find_cooldown,
                                   learning_rate, learning_rate_schedule, make_optimizer,
                                   replace_cooldown)


def train_config(**overrides):
  config = base_config()
  config.train.update(overrides)
  return config.train


def test_the_learning_rate_schedule_is_the_papers_formula():
  schedule = learning_rate_schedule(base_config().train, 512)  # warmup_steps = 4000
  for step in (1, 100, 4000, 4001, 20000, 100000):
    expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
    np.testing.assert_allclose(float(schedule(step - 1)), expected, rtol=1e-6)


def test_the_cooldown_factor_falls_linearly_from_first_to_end():
  plan = jnp.array([4, 8, 0], jnp.int32)
  factors = [float(cooldown_factor(jnp.int32(step), plan)) for step in range(10)]
  assert factors == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0, 0]
  assert float(cooldown_factor(jnp.int32(10**9), jnp.array(NO_COOLDOWN, jnp.int32))) == 1.0


def test_an_optimizer_without_a_cooldown_has_none_in_its_state():
  tx = make_optimizer(train_config(), 8)
  assert find_cooldown(tx.init({"w": jnp.ones(3)})) is None


@pytest.mark.parametrize("accum", [1, 2])
def test_the_cooldown_scales_adams_updates_and_the_reported_rate(accum):
  """Steps 0..5 under the plan (2, 6): the updates are Adam's times (6 - step) / 4 from step 2,
  counted over every batch (gradient accumulation too), and `learning_rate` reports the same."""
  train = train_config(cooldown_fraction=0.5, grad_accum_steps=accum, warmup_steps=10)
  plain = make_optimizer(train_config(grad_accum_steps=accum, warmup_steps=10), 8)
  cooled = make_optimizer(train, 8)
  params = {"w": jnp.arange(3.0)}
  plain_state, state = plain.init(params), cooled.init(params)
  state = replace_cooldown(state, CooldownState(jnp.int32(0), jnp.array([2, 6, 0], jnp.int32)))
  rate = learning_rate(train, 8)
  schedule = learning_rate_schedule(train, 8)
  for step in range(6):
    grads = {"w": jnp.array([1.0, -2.0, 0.5]) * (step + 1)}
    expected, plain_state = plain.update(grads, plain_state, params)
    got, new_state = cooled.update(grads, state, params)
    factor = min(1.0, (6 - step) / 4)
    np.testing.assert_allclose(got["w"], expected["w"] * np.float32(factor), rtol=1e-6)
    np.testing.assert_allclose(float(rate(jnp.int32(step), state)),
                               float(schedule(step // accum)) * factor, rtol=1e-6)
    state = new_state
  assert int(find_cooldown(state).count) == 6
  assert find_cooldown(state).plan.tolist() == [2, 6, 0]
