"""Data, fully sharded data and tensor parallelism on 8 simulated devices: the same training as one
device, every parameter split the way `config.mesh.rules` says, and no full rematerialization."""

import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_run import tiny_batches, tiny_setup
from transformer_jax import steps

ROOT = pathlib.Path(__file__).resolve().parent.parent
MESHES = [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2), dict(fsdp=4, tensor=2)]
STEPS = 3


def mesh_setup(mesh: dict, devices: int = 8):
  config, _ = tiny_setup()  # Dropout on: its masks do not depend on the sharding either.
  config.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **mesh})
  return config, steps.make_setup(config, jax.devices()[:devices])


def train(setup, batches):
  state, key, losses = setup.init_state(0), jax.random.key(1), []
  for k in range(STEPS):
    state, metrics = setup.train_step(state, setup.put_batch(batches[k]), key)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


def config_lr():
  from transformer_jax.optim import learning_rate_schedule
  config, _ = tiny_setup()
  return max(float(learning_rate_schedule(config.train, config.model.d_model)(k)) for k in range(STEPS))


@pytest.fixture(scope="module")
def one_device():
  config, setup = mesh_setup({"data": 1}, devices=1)
  _, eight = mesh_setup({"data": 8})
  batches = tiny_batches(config, eight)  # Rows a multiple of 8, for every mesh here.
  return batches, train(setup, batches)


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_training_on_a_mesh_equals_training_on_one_device(one_device, mesh):
  batches, (losses, params) = one_device
  _, setup = mesh_setup(mesh)
  mesh_losses, mesh_params = train(setup, batches)
  np.testing.assert_allclose(mesh_losses, losses, rtol=1e-5)
  # Adam moves a parameter by up to the learning rate a step whatever its gradient's size, so a
  # gradient summed in another order (rounding) shows in a parameter as the rate times its relative
  # rounding: up to 1e-4 of the rate here (an embedding row of a rare token, fsdp4xtensor2 on an
  # AVX2 CPU). A sharding error moves parameters by a good part of the rate.
  atol = 1e-3 * config_lr()
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(mesh_params), jax.tree.leaves(params)):
    name = jax.tree_util.keystr(path)
    if name.endswith("['key']['bias']"):
      # Softmax ignores a key bias (it adds the same q.b to every score of a query), so its
      # gradient is 0 up to rounding, and Adam scales that rounding noise up to +-lr: compare
      # its size, not its values.
      assert np.abs(a).max() < 10 * config_lr(), name
      continue
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol, err_msg=name)


@pytest.mark.parametrize("mesh", MESHES[1:], ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_every_parameter_is_split_as_the_rules_say(mesh):
  config, setup = mesh_setup(mesh)
  rules = {name: (axes,) if isinstance(axes, str) else tuple(axes or ()) for name, axes in config.mesh.rules}
  sizes = dict(setup.mesh.shape)
  tokens = jnp.ones((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda: setup.model.init(jax.random.key(0), tokens, tokens))["params"]
  logical = [x.names for x in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))]
  params = jax.tree.leaves(setup.init_state(0).params)
  assert len(logical) == len(params)
  split = 0
  for names, param in zip(logical, params):
    used: set[str] = set()  # A mesh axis splits one dimension at most (flax drops repeats).
    expected = []
    for dim, name in zip(param.shape, names):
      axes = [a for a in rules.get(name, ()) if a not in used]
      used.update(axes)
      expected.append(dim // math.prod(sizes[a] for a in axes))
    for shard in param.addressable_shards:
      assert shard.data.shape == tuple(expected), (names, param.shape, shard.data.shape)
    split += tuple(expected) != param.shape
  assert split > len(params) // 2  # Most parameters are really split.


REMAT_CHECK = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import sys
sys.path[:0] = ["tests", "."]
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from tiny_run import tiny_batches, tiny_setup
from transformer_jax import steps

config, _ = tiny_setup()
config.mesh.update(dict(data=2, fsdp=2, tensor=2))
setup = steps.make_setup(config, jax.devices()[:8])
if sys.argv[1] == "naive":  # A lookup in a (vocab, embed)-split table, its output split three ways.
  table = jax.device_put(jnp.ones((40, 32)), NamedSharding(setup.mesh, P("tensor", "fsdp")))
  tokens = jax.device_put(jnp.ones((8, 16), jnp.int32), NamedSharding(setup.mesh, P(("data", "fsdp"))))
  out = NamedSharding(setup.mesh, P("data", "fsdp", "tensor"))  # Rematerialised by jax 0.10 and 0.11.
  jax.jit(lambda t, i: jax.lax.with_sharding_constraint(jnp.take(t, i, axis=0), out)).lower(table, tokens).compile()
else:
  state = setup.init_state(0)
  setup.train_step(state, setup.put_batch(tiny_batches(config, setup)[0]), jax.random.key(0))
print("compiled")
"""


def test_tensor_parallel_steps_compile_without_full_rematerialization():
  def compile_in_a_fresh_process(what):
    result = subprocess.run([sys.executable, "-c", REMAT_CHECK, what], capture_output=True, text=True,
                            timeout=240, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert "compiled" in result.stdout, result.stderr[-3000:]
    return result.stderr
  # XLA says so on stderr; a plain lookup shows that it does here.
  assert "Involuntary full rematerialization" in compile_in_a_fresh_process("naive")
  assert "Involuntary full rematerialization" not in compile_in_a_fresh_process("model")
