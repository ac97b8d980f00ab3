"""`transformer-compile`: a run's train step and beam search compiled for a TPU slice or N CPU
devices, with the memory each device needs (`aot` does the compiling and measuring).

  transformer-compile --config configs/big.py --topology v5p:2x2x1 --config.mesh.fsdp=4
  transformer-compile --config configs/base.py --topology v5e:2x4 --find_batch
  transformer-compile --config configs/small.py --topology cpu:8

The flags are train.py's (`--config FILE --config.a.b=value`), plus --topology, --find_batch,
--memory_gib and --nodecode. Exit status 1: a program does not fit the devices' memory.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

import ml_collections

from transformer_jax.aot import (GIB, batch_shape, chip_memory, compile_run, format_report, largest_batch,
                                 topology_devices)
from transformer_jax.errors import ConfigError, run_command
from transformer_jax.steps import make_setup

# The checkout holding configs/ (the default --config), when installed in place (pip install -e).
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compile_and_report(config: ml_collections.ConfigDict, topology: str, *, find_batch: bool = False,
                       memory_gib: float = 0.0, decode: bool = True, out: TextIO = sys.stdout) -> int:
  """Compiles (and reports on) the run for `topology`; returns an exit status (1: does not fit)."""
  devices = topology_devices(topology)
  memory = chip_memory(devices, memory_gib)
  setup = make_setup(config, devices)
  print(f"{topology}: {len(devices)} x {devices[0].device_kind}"
        + (f", {memory / GIB:.4g} GiB each" if memory else "")
        + f"; mesh {dict(setup.mesh.shape)}; model {setup.model_config.dtype}", file=out)
  reports = compile_run(config, devices, decode=decode)
  for report in reports:
    print(format_report(report, memory), file=out)
  if find_batch:
    if memory is None:
      raise ConfigError(f"--find_batch on {topology} needs --memory_gib (a CPU has no fixed memory per device)")
    print("largest batch that fits:", file=out)
    tokens, best = largest_batch(config, devices, memory, log=lambda s: print(s, file=out))
    rows, length = batch_shape(config, setup) if tokens == 0 else (tokens // int(config.data.max_len), int(config.data.max_len))
    if tokens == 0:
      print("  not even one row per data-parallel shard fits", file=out)
    else:
      wanted = int(config.data.tokens_per_batch) * int(config.train.grad_accum_steps)
      advice = ("" if tokens >= wanted else f"; for the config's {wanted:,} tokens per update use "
                f"train.grad_accum_steps={-(-wanted // tokens)}")
      print(f"  data.tokens_per_batch={tokens} ({rows} rows of {length}; "
            f"{best.total / GIB:.2f} GiB per device){advice}", file=out)
  return 0 if memory is None or all(r.total <= memory for r in reports) else 1


def main_entry() -> None:
  """`transformer-compile`: flags as train.py's (`--config FILE --config.a.b=value`), plus
  --topology, --find_batch, --memory_gib and --nodecode."""
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file(
      "config", os.path.join(REPOSITORY, "configs", "small.py"),
      "Config file, as for train.py; override any field with --config.a.b=value.", lock_config=True)
  topology = flags.DEFINE_string("topology", "cpu:8", "cpu:N, or a TPU slice such as v5e:2x4, v5p:2x2x1, v6e:2x2")
  find_batch = flags.DEFINE_bool("find_batch", False, "search for the largest data.tokens_per_batch that fits")
  memory_gib = flags.DEFINE_float("memory_gib", 0.0, "memory per device; default the chip's HBM")
  decode = flags.DEFINE_bool("decode", True, "also compile beam search")

  def run(argv) -> None:
    del argv
    # Before JAX creates its clients: the CPU as N devices, and no attempt at a real TPU (libtpu,
    # installed for the TPU compiler, would look for one and log its absence at length).
    os.environ["JAX_PLATFORMS"] = "cpu"
    if topology.value.startswith("cpu:"):
      count = topology.value.split(":", 1)[1]
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                 + f" --xla_force_host_platform_device_count={count}").strip()
    sys.exit(run_command("transformer-compile", lambda: compile_and_report(
        config_flag.value, topology.value, find_batch=find_batch.value, memory_gib=memory_gib.value,
        decode=decode.value)))

  app.run(run)


if __name__ == "__main__":
  main_entry()
