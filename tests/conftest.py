"""Tiny configurations shared by the tests; everything runs on the CPU in seconds."""

import os

# Several fake CPU devices for the sharding tests; must be set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _share_compilations() -> None:
  """One persistent compilation cache for the whole test run: the pytest workers and every process
  the tests start (tiny runs, notebooks' kernels, benchmarks) inherit it, so each train step or
  decoder compiles once instead of once per process (a tiny run's process took 10 s instead of 19
  on a 2-core Zen 3). It is made empty for each run and removed after it: nothing from an earlier
  run is reused. jax keeps programs that took at least a second to compile (its default): about
  a hundred files for the whole run. There is no size limit: with one, every write lists the
  whole directory."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # A worker (the controller made it), or the user's.
    return
  import atexit
  import shutil
  import tempfile
  cache = tempfile.mkdtemp(prefix="transformer_jax_tests_xla_")
  atexit.register(shutil.rmtree, cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache


_share_compilations()

import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

# The repository root, for the tests that import the bench package (bench.plan_scale's list_plan,
# bench.torch_peer): pytest puts only tests/ on the path, and `python -m pytest` adds the current
# directory, which need not be the root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from transformer_jax import Transformer, TransformerConfig  # noqa: E402

TINY = TransformerConfig(vocab_size=40, d_model=32, d_ff=64, num_heads=4, num_layers=2,
                         max_len=32, dropout_rate=0.1)


def tiny_config(**overrides) -> TransformerConfig:
  return dataclasses.replace(TINY, **overrides)


def init_params(config: TransformerConfig, src: jax.Array, tgt: jax.Array, seed: int = 0):
  variables = Transformer(config).init(jax.random.key(seed), src, tgt)
  return nn.meta.unbox(variables)["params"]


def random_tokens(key: jax.Array, shape: tuple[int, int], vocab_size: int) -> jax.Array:
  """Tokens in [4, vocab_size): never padding or a special id."""
  return jax.random.randint(key, shape, 4, vocab_size, dtype=jnp.int32)


@pytest.fixture
def tiny():
  return TINY
