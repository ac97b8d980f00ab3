"""Process settings for training on a CPU, applied by the entry points before JAX starts, and the
description of the machine that every reported figure carries.

XLA:CPU allocates a train step's temporaries as one block (over a gigabyte for the base model at
8 x 128 tokens). A worker thread gets a block that large from glibc as a fresh mmap, unmapped when
the step ends, so each step page-faults the whole block in again. `keep_cpu_step_memory` keeps the
block in the heap from one step to the next. BENCHMARKS.md has the page faults and step times with
and without it.
"""

from __future__ import annotations

import ctypes
import os
import platform

import jax

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # What moves a CPU's speed.


def keep_cpu_step_memory() -> bool:
  """Lets XLA:CPU reuse a train step's temporary memory instead of faulting it in afresh each step,
  when the run's backend is the CPU.

  Runs CPU computations on the calling thread (no asynchronous dispatch; the training loop waits
  for each step anyway) and switches glibc's mmap and heap trimming off. Trimming must be off, not
  just rare: a trim threshold below the block's size (a larger batch's block) brings the faults
  back. The cost: the process keeps its peak heap rather than returning it to the system.

  On a GPU or TPU host the glibc settings are left alone (the host's memory serves data loading
  and checkpoints there, and nothing gains from keeping its peak); the dispatch setting applies
  to the CPU client only, which runs no step there.

  Call it before JAX creates its backends' clients (train.py calls it after jax.distributed's
  initialisation, which creates none): once the CPU client exists, its dispatch mode is fixed.
  It creates them, to learn the backend.

  Returns:
    Whether the glibc settings were applied (False on other backends, or where there is no glibc,
    e.g. macOS).
  """
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  if jax.default_backend() != "cpu":
    return False
  return keep_heap()


def keep_heap() -> bool:
  """The glibc half of `keep_cpu_step_memory`: large blocks from the heap, which never shrinks.

  Returns False where there is no glibc."""
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  # A trim threshold of -1 (SIZE_MAX once glibc casts it) never gives the heap's top back.
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
  """'AMD EPYC (family 26, model 2), 2 cores, avx2 avx512f avx512_bf16', from /proc/cpuinfo.

  CPUs sold under one name differ (a 2x different matmul peak between AMD Zen 4 and Zen 5 has been
  seen), so a figure names the family, model and the vector extensions that matter.
  """
  info = {}
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, sep, value = line.partition(":")
        if sep and key.strip() not in info:
          info[key.strip()] = value.strip()
  except OSError:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
  flags = set(info.get("flags", "").split())
  isa = " ".join(f for f in ISA_FLAGS if f in flags) or "no AVX2"
  return (f"{info.get('model name', platform.machine())} (family {info.get('cpu family', '?')}, "
          f"model {info.get('model', '?')}), {os.cpu_count()} cores, {isa}")


def machine_description() -> str:
  """The CPU, and the accelerators when the run has them: what a run's figures were measured on."""
  if jax.default_backend() == "cpu":
    return cpu_description()
  return f"{jax.device_count()} x {jax.devices()[0].device_kind}; host: {cpu_description()}"
