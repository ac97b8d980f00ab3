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
