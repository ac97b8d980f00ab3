"""Ahead-of-time compilation: a run's train step and decoding compiled for a TPU slice you do not
have (or for N CPU devices), with the memory each chip needs, before renting the slice.

  transformer-compile --config configs/big.py --topology v5p:2x2x1 --config.mesh.fsdp=4
  transformer-compile --config configs/base.py --topology v5e:2x4 --find_batch
  transformer-compile --config configs/small.py --topology cpu:8

(the command's flags are `cli.compile`'s; the compiling and measuring are here).

libtpu (`pip install -e ".[tpu]"`) holds XLA's TPU compiler; with it, `jax.experimental.topologies`
describes any slice by name and the run's own jitted steps (`steps.make_setup` on its abstract
devices) compile for it from shapes alone (`jax.ShapeDtypeStruct`s with the run's shardings), as
MaxText's train_compile.py and t5x's precompile.py do. Nothing runs. Figures are the compiler's:
per-chip arguments, outputs, temporaries and code (`compiled.memory_analysis()`), FLOPs
(`cost_analysis()`, against `flops.py`'s count) and the compile time.

The batch compiled is the largest one a run feeds: `data.tokens_per_batch // data.max_len` rows of
`data.max_len` tokens (packed rows, or the longest bucket), rounded down to a multiple of the
data-parallel shards; decoding is compiled at the config's beam size on the sources of
`decode.tokens_per_batch` (by default as many).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transformer_jax import flops, sharding, translation
from transformer_jax.config import decode_tokens_per_batch, validate_run_config
from transformer_jax.errors import ConfigError
from transformer_jax.steps import PACKING_KEYS, Setup, make_setup

GIB = 2**30
# High-bandwidth memory per chip (vendor figures), by the device kind libtpu reports.
CHIP_MEMORY_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
# Environment that lets libtpu load on a machine without a TPU, quietly, beside other processes.
_LIBTPU_ENV = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-8",
               "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}


def topology_devices(topology: str) -> list:
  """The devices of a topology name: "cpu:N" (this machine's CPU as N devices) or a TPU slice as
  libtpu names it ("v5e:2x4", "v5p:2x2x1", "v6e:2x2", "v4:2x2x1", ...).

  Raises:
    ConfigError: for a name libtpu does not know, too few CPU devices, or libtpu missing.
  """
  if topology.startswith("cpu:"):
    count = int(topology.split(":", 1)[1])
    devices = jax.devices("cpu")
    if len(devices) < count:
      raise ConfigError(f"--topology {topology}: this process has {len(devices)} CPU devices; start it "
                        f"with XLA_FLAGS=--xla_force_host_platform_device_count={count}")
    return devices[:count]
  for key, value in _LIBTPU_ENV.items():
    os.environ.setdefault(key, value)
  try:
    import libtpu  # noqa: F401  (only to say what is missing)
  except ImportError as e:
    raise ConfigError(f"--topology {topology} needs libtpu, XLA's TPU compiler: pip install -e \".[tpu]\"") from e
  from jax.experimental import topologies
  options = {"chip_config_name": "megacore"} if topology.startswith("v4") else {}  # One device a chip.
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **options).devices)
  except Exception as e:  # libtpu's own error for a name it does not know.
    raise ConfigError(f"--topology {topology}: libtpu cannot describe it ({str(e).strip()[:200]}); "
                      "names look like v5e:2x4, v5p:2x2x1, v6e:2x2, v4:2x2x1") from e


def chip_memory(devices: list, override_gib: float = 0.0) -> int | None:
  """Bytes of memory per device: the override, the chip's HBM, or None (a CPU: no fixed limit)."""
  if override_gib:
    return int(override_gib * GIB)
  gib = CHIP_MEMORY_GIB.get(devices[0].device_kind)
  return None if gib is None else int(gib * GIB)


def batch_shape(config: ml_collections.ConfigDict, setup: Setup, decoding: bool = False
                ) -> tuple[int, int]:
  """(rows, length) of the largest batch the run feeds (see the module docstring); `decoding`:
  of the largest decoding batch (`decode.tokens_per_batch`)."""
  multiple = sharding.batch_multiple(setup.mesh)
  length = int(config.data.max_len)
  tokens = decode_tokens_per_batch(config) if decoding else int(config.data.tokens_per_batch)
  field = "decode.tokens_per_batch" if decoding and config.decode.tokens_per_batch else "data.tokens_per_batch"
  rows = tokens // length // multiple * multiple
  if rows < multiple:
    raise ConfigError(
        f"{field}={tokens} holds {tokens // length} rows of data.max_len={length}, fewer than the "
        f"mesh's {multiple} data-parallel shards; use at least {multiple * length}")
  return rows, length


@dataclasses.dataclass
class Report:
  """What compiling one program gave: per-device bytes, FLOPs and time."""

  name: str
  seconds: float
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  state: int  # Of the arguments: parameters and optimiser state (train) or parameters (decode).
  batch: int  # Of the arguments: the batch (train) or the sources (decode).
  flops: float | None  # The compiler's, per device.
  model_flops: float | None  # flops.py's, per device.

  @property
  def total(self) -> int:
    """Peak bytes per device: arguments, outputs not aliased to them, temporaries and code."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def _shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _report(name: str, lowered, state: Any, batch: Any, model_flops: float | None, devices: int) -> Report:
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_ = float(cost["flops"]) if cost and "flops" in cost else None
  return Report(name, seconds, memory.argument_size_in_bytes, memory.output_size_in_bytes,
                memory.alias_size_in_bytes, memory.temp_size_in_bytes,
                memory.generated_code_size_in_bytes, _shard_bytes(state), _shard_bytes(batch), flops_,
                None if model_flops is None else model_flops / devices)


def compile_train_step(config: ml_collections.ConfigDict, setup: Setup) -> Report:
  """Compiles the run's train step for its mesh from shapes alone."""
  rows, length = batch_shape(config, setup)
  batch_sharding = sharding.batch_sharding(setup.mesh)
  keys = ("src", "tgt") + (PACKING_KEYS if config.data.packing else ())
  batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=batch_sharding) for k in keys}
  state = setup.abstract_state()
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                             sharding=jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec()))
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    lowered = setup.jit_train_step.trace(state, batch, key).lower()
  model = flops.train_step_flops(setup.model_config, rows, length, length)
  return _report(f"train step ({rows} x {length} tokens a side)", lowered, state, batch, model,
                 setup.mesh.devices.size)


def compile_decode(config: ml_collections.ConfigDict, setup: Setup) -> Report:
  """Compiles beam search (the config's beam size, alpha and max_extra_len) for its mesh."""
  rows, length = batch_shape(config, setup, decoding=True)
  params = setup.abstract_state().params
  src = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=sharding.batch_sharding(setup.mesh))
  beam = int(config.decode.beam_size)
  translate = translation.make_translate_fn(setup.model, beam, float(config.decode.length_penalty),
                                            int(config.decode.max_extra_len))
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    lowered = translate.trace(params, src).lower()
  return _report(f"decode (beam {beam}, {rows} sources of {length} tokens)", lowered, params, src, None,
                 setup.mesh.devices.size)


def compile_run(config: ml_collections.ConfigDict, devices: list, *, decode: bool = True) -> list[Report]:
  validate_run_config(config)
  setup = make_setup(config, devices)
  reports = [compile_train_step(config, setup)]
  if decode:
    reports.append(compile_decode(config, setup))
  return reports


def train_step_fits(config: ml_collections.ConfigDict, devices: list, memory: int) -> tuple[bool, Report | None]:
  """Whether the train step fits `memory` bytes per device; a compile that runs out of memory
  (XLA's RESOURCE_EXHAUSTED) counts as not fitting."""
  try:
    report = compile_run(config, devices, decode=False)[0]
  except Exception as e:  # XlaRuntimeError; its type is not public API.
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      return False, None
    raise
  return report.total <= memory, report


def largest_batch(config: ml_collections.ConfigDict, devices: list, memory: int,
                  log=print) -> tuple[int, Report | None]:
  """The largest `data.tokens_per_batch` whose train step fits `memory` bytes per device, in whole
  rows per data-parallel shard ("units").

  A train step's memory is close to affine in its batch, so each guess comes from the line through
  two compiled points (extrapolated from the largest that fit, then interpolated between the
  largest that fit and the smallest that did not); it ends when those two are one unit apart, or
  1/16 of the answer apart (the TPU compiler rematerialises to fit as the batch nears the chip's
  memory, so there the figures stop growing and the search bisects). Typically four to eight
  compiles, where bisection from one row would take a dozen or more.

  Returns:
    (tokens_per_batch, its report); (0, None) if not even one row per shard fits.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # Changed here, not the caller's.
  setup = make_setup(config, devices)
  unit = sharding.batch_multiple(setup.mesh) * int(config.data.max_len)  # One row per shard.
  fitting: dict[int, Report] = {}  # units -> report
  failing: set[int] = set()
  totals: dict[int, int] = {}  # units -> bytes per device, for every compile that finished

  def measure(units: int) -> None:
    config.data.tokens_per_batch = units * unit
    ok, report = train_step_fits(config, devices, memory)
    if report is not None:
      totals[units] = report.total
    if ok:
      fitting[units] = report
    else:
      failing.add(units)
    log(f"  tokens_per_batch {units * unit:>9,}: "
        + ("out of memory" if report is None else f"{report.total / GIB:.2f} GiB")
        + (" fits" if ok else " does not fit"))

  def through(u0: int, u1: int) -> int:
    """Where the line through two compiled points reaches `memory`."""
    slope = (totals[u1] - totals[u0]) / (u1 - u0)
    return u0 + int((memory - totals[u0]) // slope) if slope > 0 else 2 * u1

  guess = max(2, int(config.data.tokens_per_batch) // unit)  # The config's own batch next.
  measure(1)
  if not fitting:
    return 0, None
  for _ in range(20):
    measure(guess)
    low = max(fitting)
    high = min((u for u in failing if u > low), default=None)
    if high is not None and high - low <= max(1, low // 16):
      break
    if high is None:  # Extrapolate from the two largest that fit, at most 8x further.
      u0, u1 = sorted(fitting)[-2:] if len(fitting) > 1 else (low, low)
      guess = min(through(u0, u1) if u1 > u0 else 2 * low, 8 * low)
    elif high in totals:  # Interpolate between the bounds.
      guess = through(low, high)
    else:  # The compiler ran out of memory at `high`: no figure to interpolate with.
      guess = (low + high) // 2
    guess = max(low + 1, guess if high is None else min(guess, high - 1))
  low = max(fitting)
  return low * unit, fitting[low]


def format_report(report: Report, memory: int | None) -> str:
  lines = [f"{report.name}: compiled in {report.seconds:.1f} s",
           f"  per device: arguments {report.arguments / GIB:.3f} GiB (state {report.state / GIB:.3f}, "
           f"batch {report.batch / 2**20:.2f} MiB), "
           f"temporaries {report.temporaries / GIB:.3f} GiB, code {report.code / GIB:.3f} GiB, "
           f"outputs not aliased {(report.outputs - report.aliased) / GIB:.3f} GiB",
           f"  total {report.total / GIB:.3f} GiB"
           + ("" if memory is None else f" of {memory / GIB:.4g} GiB: "
              + ("fits" if report.total <= memory else "DOES NOT FIT"))]
  if report.flops is not None:
    line = f"  compiler FLOPs per device {report.flops:.4g}"
    if report.model_flops:
      line += f", flops.py {report.model_flops:.4g} (ratio {report.flops / report.model_flops:.3f})"
    lines.append(line)
  return "\n".join(lines)
