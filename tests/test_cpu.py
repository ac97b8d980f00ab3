"""CPU-only process settings: applied on a CPU backend, nothing process-wide on an accelerator."""

import jax
import pytest

from transformer_jax import cpu


@pytest.fixture
def fake_libc(monkeypatch):
  calls = []

  class Libc:
    def mallopt(self, param, value):
      calls.append((param, value))
      return 1

  monkeypatch.setattr(cpu.ctypes, "CDLL", lambda name: Libc())
  dispatch = jax.config.read("jax_cpu_enable_async_dispatch")
  yield calls
  jax.config.update("jax_cpu_enable_async_dispatch", dispatch)  # This process's client is made.


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_glibc_is_left_alone_on_an_accelerator(fake_libc, monkeypatch, backend):
  monkeypatch.setattr(cpu.jax, "default_backend", lambda: backend)
  assert cpu.keep_cpu_step_memory() is False
  assert fake_libc == []


def test_on_a_cpu_mmap_and_trimming_are_switched_off(fake_libc, monkeypatch):
  monkeypatch.setattr(cpu.jax, "default_backend", lambda: "cpu")
  assert cpu.keep_cpu_step_memory() is True
  assert fake_libc == [(cpu._M_MMAP_MAX, 0), (cpu._M_TRIM_THRESHOLD, -1)]
  assert jax.config.read("jax_cpu_enable_async_dispatch") is False


def test_the_cpu_description_names_family_model_and_vector_extensions(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                     "model name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 avx512f avx512_bf16 sse\n\n"
                     "processor\t: 1\nmodel name\t: ignored, the first CPU is described\n")
  described = cpu.cpu_description(str(cpuinfo))
  assert described.startswith("AMD EPYC 9B14 (family 25, model 17), ")
  assert described.endswith(" cores, avx2 avx512f avx512_bf16")
  cpuinfo.write_text("model name\t: Old CPU\nflags\t\t: sse sse2\n")
  assert cpu.cpu_description(str(cpuinfo)).endswith("no AVX2")
  assert "cores" in cpu.cpu_description(str(tmp_path / "missing"))  # Not Linux: still a description.
  assert cpu.machine_description() == cpu.cpu_description()  # The tests run on the CPU backend.
