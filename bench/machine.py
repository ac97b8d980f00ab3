"""The machine a benchmark ran on, printed with every figure: CPUs of one kind differ (a 2x
different matmul peak between AMD Zen 4 and Zen 5 has been seen), so a ratio names its CPU."""

import os
import platform

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> str:
  """'AMD EPYC (family 26, model 2), 2 cores, avx2 avx512f avx512_bf16' from /proc/cpuinfo."""
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
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
