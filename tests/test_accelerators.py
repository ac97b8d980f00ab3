"""The host's accelerator from its device files; a GPU or TPU that JAX leaves for the CPU is said
loudly (train.py's first lines) or refused (strict); cuDNN's attention is refused below compute
capability 8.0, on made-up devices."""

import logging
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import jax
import pytest

from transformer_jax import accelerators
from transformer_jax.accelerators import GPU, TPU, AcceleratorError
from transformer_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
VERSIONS = {"jax": "0.10.2", "jaxlib": "0.10.2", "jax-cuda12-plugin": "0.7.2"}  # Colab's leftover.


def host(tmp_path, *files):
  """A made-up root holding `files` (under dev/)."""
  for name in files:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).touch()
  return tmp_path


@pytest.mark.parametrize("files, environ, expected", [
    ((), {}, None),
    (("dev/nvidia0", "dev/nvidiactl"), {}, GPU),
    (("dev/nvidiactl",), {}, GPU),  # A container given GPUs.
    (("dev/accel0", "dev/accel1"), {}, TPU),  # TPU v4 and older.
    (("dev/vfio/vfio", "dev/vfio/0"), {}, TPU),  # v5e and newer.
    (("dev/vfio/vfio",), {}, None),  # VFIO's control file alone is no TPU.
    ((), {"COLAB_GPU": "1"}, GPU),
    ((), {"COLAB_GPU": "0"}, None),
    ((), {"COLAB_TPU_ADDR": "10.0.0.2:8470"}, TPU),
], ids=["plain", "nvidia", "container", "accel", "vfio", "vfio_control", "colab_gpu", "colab_cpu", "colab_tpu"])
def test_the_host_accelerator_is_read_from_device_files(tmp_path, files, environ, expected):
  assert accelerators.host_accelerator(host(tmp_path, *files), environ) == expected


def test_a_gpu_left_unused_is_explained_with_the_fix():
  message = accelerators.unused_accelerator_message(GPU, "cpu", "1 x cpu", VERSIONS)
  assert "has an NVIDIA GPU but JAX runs on the CPU (1 x cpu" in message
  assert "jax-cuda12-plugin 0.7.2 (not jaxlib's 0.10.2: JAX ignores it)" in message
  assert '.[cuda12]' in message and accelerators.CHECK in message
  tpu = accelerators.unused_accelerator_message(TPU, "cpu", "1 x cpu", {**VERSIONS, "libtpu": "0.0.21.1"})
  assert "has a TPU" in tpu and "libtpu 0.0.21.1" in tpu and '.[tpu]' in tpu
  assert accelerators.unused_accelerator_message(GPU, "gpu", "1 x H100", VERSIONS) is None
  assert accelerators.unused_accelerator_message(None, "cpu", "1 x cpu", VERSIONS) is None


def test_a_run_warns_and_a_notebook_stops_where_jax_leaves_the_gpu(tmp_path, caplog):
  gpu_host = host(tmp_path, "dev/nvidia0")
  with caplog.at_level(logging.INFO, logger="transformer_jax.accelerators"):
    message = accelerators.check_backend(strict=False, root=gpu_host, environ={})
  assert message and "JAX runs on the CPU" in message
  assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING]
  with pytest.raises(AcceleratorError, match="has an NVIDIA GPU but JAX runs on the CPU"):
    accelerators.check_backend(strict=True, root=gpu_host, environ={})
  # JAX_PLATFORMS=cpu is a choice, not a mistake; and a host without an accelerator is fine.
  assert accelerators.check_backend(strict=True, root=gpu_host, environ={"JAX_PLATFORMS": "cpu"}) is None
  assert accelerators.check_backend(strict=True, root=host(tmp_path / "plain"), environ={}) is None


def test_train_py_says_so_in_its_first_lines(tmp_path):
  # COLAB_GPU stands for a GPU host; the missing corpus then stops the run right after the check.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env.update(COLAB_GPU="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(
      [sys.executable, "train.py", f"--workdir={tmp_path}", "--config.data.dataset=text",
       f"--config.data.text_train={tmp_path / 'missing.tsv'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.splitlines()
  warning = next(i for i, line in enumerate(lines) if "has an NVIDIA GPU but JAX runs on the CPU" in line)
  assert warning < 10 and "!" * 100 in lines[warning - 1], lines[:warning + 2]


def gpu(kind: str, capability: str | None):
  return SimpleNamespace(platform="gpu", device_kind=kind, compute_capability=capability)


@pytest.mark.parametrize("device, supported", [
    (gpu("Tesla T4", "7.5"), False),
    (gpu("Tesla V100-SXM2-16GB", "7.0"), False),
    (gpu("NVIDIA A100-SXM4-40GB", "8.0"), True),
    (gpu("NVIDIA L4", "8.9"), True),
    (gpu("NVIDIA H100 80GB HBM3", "9.0"), True),
    (gpu("NVIDIA B200", "10.0"), True),  # Compared as numbers, not strings.
    (gpu("an abstract GPU", None), True),  # Ahead-of-time topologies do not say: left to XLA.
], ids=lambda x: getattr(x, "device_kind", x))
def test_cudnn_attention_needs_compute_capability_8(device, supported):
  assert accelerators.supports_cudnn_attention(device) == supported
  if supported:
    accelerators.check_cudnn_attention([device])
  else:
    with pytest.raises(ConfigError, match=f"compute capability 8.0 or newer.*{device.device_kind} has "
                                          f"{device.compute_capability}: use 'dot_product'"):
      accelerators.check_cudnn_attention([device])


def test_cudnn_attention_is_refused_off_a_gpu():
  with pytest.raises(ConfigError, match="needs an NVIDIA GPU.*CPUs"):
    accelerators.check_cudnn_attention(jax.devices()[:1])
  with pytest.raises(ConfigError, match="TPUs"):
    accelerators.check_cudnn_attention([SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")])


def test_devices_are_described_by_kind_and_count():
  devices = [gpu("NVIDIA A100", "8.0")] * 2 + [gpu("Tesla T4", "7.5")]
  assert accelerators.describe_devices(devices) == "2 x NVIDIA A100, 1 x Tesla T4"


def test_the_cpu_quick_start_on_a_gpu_points_at_the_gpu_config():
  root = pathlib.Path(__file__).resolve().parent.parent
  hint = accelerators.quick_start_hint(GPU, str(root / "configs" / "small.py"))
  gpu_config = root / "configs" / "gpu.py"
  assert f"--config {gpu_config}" in hint and gpu_config.exists()
  assert accelerators.quick_start_hint("cpu", str(root / "configs" / "small.py")) is None
  assert accelerators.quick_start_hint(GPU, str(gpu_config)) is None
  assert accelerators.quick_start_hint(TPU, str(root / "configs" / "small.py")) is None
