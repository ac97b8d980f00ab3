"""The host's accelerator, whether JAX is using it, and whether a GPU has the kernels a config asks
for.

A jax install without the build for the host's accelerator (plain `pip install` on an NVIDIA host,
a CUDA plugin or libtpu left over from another jax version, as on Colab) does not fail: JAX falls
back to the CPU with a warning that scrolls by, and a run meant for a GPU trains for hours at CPU
speed. `host_accelerator` reads the host's device files, which needs neither a driver library nor
JAX, and `check_backend` compares them with the backend JAX started: a run says so in its first log
lines, with the install line that fixes it, and a notebook stops.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

from transformer_jax.errors import ConfigError, UserError

log = logging.getLogger(__name__)

GPU, TPU = "gpu", "tpu"
# The device files of an NVIDIA driver (as JAX's own check: /dev/dxg is WSL2's GPU), and of TPU
# chips: /dev/accel* up to v4, VFIO groups from v5e on.
GPU_DEVICE_FILES = ("dev/nvidia0", "dev/nvidiactl", "dev/dxg")
TPU_DEVICE_GLOBS = ("dev/accel*", "dev/vfio/[0-9]*")
NAMES = {GPU: "an NVIDIA GPU", TPU: "a TPU"}
INSTALL = {GPU: 'pip install -e ".[cuda12]" (".[cuda13]" with a CUDA 13 driver)',
           TPU: 'pip install -e ".[tpu]"'}
# What decides whether JAX can use the accelerator: jax, jaxlib and the plugin for it.
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")
CHECK = 'python -c "import jax; print(jax.devices())"'
CUDNN_ATTENTION_MIN_CAPABILITY = (8, 0)  # cuDNN's fused attention: Ampere (A100) and newer.


class AcceleratorError(UserError, RuntimeError):
  """The host has a GPU or TPU that JAX does not use; the message says what to install."""


def host_accelerator(root: str | os.PathLike = "/", environ: Mapping[str, str] | None = None) -> str | None:
  """"gpu" or "tpu" when the host has one, by its device files (and Colab's variables).

  Args:
    root: where to look for dev/ (tests give a made-up tree).
    environ: the environment (default os.environ); Colab sets COLAB_GPU on GPU runtimes and
      COLAB_TPU_ADDR on its older TPU runtimes.

  Returns:
    GPU, TPU, or None for a host with neither.
  """
  environ = os.environ if environ is None else environ
  root = pathlib.Path(root)
  if environ.get("COLAB_TPU_ADDR") or any(next(root.glob(p), None) for p in TPU_DEVICE_GLOBS):
    return TPU
  if environ.get("COLAB_GPU", "0") not in ("", "0") or any((root / f).exists() for f in GPU_DEVICE_FILES):
    return GPU
  return None


def installed_versions() -> dict[str, str]:
  """The versions of those of PACKAGES that are installed, for the messages."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def describe_devices(devices: Iterable[Any]) -> str:
  """"8 x TPU v5 lite" for a list of JAX devices (kinds in order of first appearance)."""
  counts: dict[str, int] = {}
  for device in devices:
    counts[device.device_kind] = counts.get(device.device_kind, 0) + 1
  return ", ".join(f"{n} x {kind}" for kind, n in counts.items())


def unused_accelerator_message(accelerator: str | None, backend: str, devices: str,
                               versions: Mapping[str, str]) -> str | None:
  """What to tell a run whose host has `accelerator` but whose JAX `backend` is another.

  Args:
    accelerator: `host_accelerator()`.
    backend: `jax.default_backend()`.
    devices: `describe_devices(jax.devices())`.
    versions: `installed_versions()`.

  Returns:
    The message, or None when JAX uses the accelerator (or there is none).
  """
  if accelerator is None or backend == accelerator:
    return None
  jaxlib = versions.get("jaxlib")
  plugins = [f"{name} {version}" + (f" (not jaxlib's {jaxlib}: JAX ignores it)" if version != jaxlib else "")
             for name, version in versions.items() if name.startswith("jax-cuda")]
  if accelerator == TPU:
    plugins = [f"libtpu {versions['libtpu']}"] if "libtpu" in versions else []
  installed = ", ".join([f"jax {versions.get('jax', '?')}, jaxlib {jaxlib or '?'}", *plugins])
  return (f"This host has {NAMES[accelerator]} but JAX runs on the {backend.upper()} ({devices}; "
          f"installed: {installed}). Install the {accelerator.upper()} build: {INSTALL[accelerator]}, "
          f"then check with {CHECK}.")


def check_backend(*, strict: bool, root: str | os.PathLike = "/",
                  environ: Mapping[str, str] | None = None) -> str | None:
  """Logs the devices JAX uses and, loudly, an accelerator it does not; starts JAX's backends.

  A CPU chosen with JAX_PLATFORMS=cpu is taken as meant and only noted.

  Args:
    strict: raise instead of warning (the notebooks stop; a run warns and goes on).
    root: as for `host_accelerator`.
    environ: as for `host_accelerator`.

  Returns:
    The warning given, or None.

  Raises:
    AcceleratorError: with `strict`, on a host whose accelerator JAX does not use.
  """
  import jax

  environ = os.environ if environ is None else environ
  backend, devices = jax.default_backend(), describe_devices(jax.devices())
  log.info("JAX %s on %s (%s backend).", jax.__version__, devices, backend)
  message = unused_accelerator_message(host_accelerator(root, environ), backend, devices,
                                       installed_versions())
  if message is None:
    return None
  if environ.get("JAX_PLATFORMS", "").strip().lower() == backend:
    log.info("JAX_PLATFORMS=%s: the run stays off the host's accelerator, as asked.", backend)
    return None
  if strict:
    raise AcceleratorError(message)
  rule = "!" * 100
  log.warning("\n%s\n%s\n%s", rule, message, rule)
  return message


def quick_start_hint(backend: str, config_file: str) -> str | None:
  """What to tell a run of the CPU quick start's config (configs/small.py) on a GPU, where its
  30-minute budget would be hundreds of epochs of the corpus in float32; None elsewhere."""
  if backend != GPU or os.path.basename(config_file) != "small.py":
    return None
  gpu_config = os.path.join(os.path.dirname(config_file), "gpu.py")
  return (f"{config_file} is the quick start sized for a CPU (30 minutes in float32, about 7 epochs "
          f"there). On this GPU, {gpu_config} trains the same model and recipe in bfloat16 with "
          "cuDNN's attention, held to its steps: python train.py --config "
          f"{gpu_config} --workdir runs/gpu")


def compute_capability(device: Any) -> tuple[int, ...] | None:
  """An NVIDIA GPU's compute capability as (major, minor), from JAX's `device.compute_capability`
  ("8.0"); None where the device does not say (another platform, an abstract device)."""
  value = getattr(device, "compute_capability", None)
  try:
    return tuple(int(part) for part in str(value).split("."))
  except ValueError:
    return None


def supports_cudnn_attention(device: Any) -> bool:
  """Whether cuDNN's fused attention runs on `device`: an NVIDIA GPU of compute capability 8.0 or
  newer (a T4 is 7.5, a V100 7.0)."""
  capability = compute_capability(device)
  return device.platform == "gpu" and (capability is None or capability >= CUDNN_ATTENTION_MIN_CAPABILITY)


def check_cudnn_attention(devices: Iterable[Any]) -> None:
  """Refuses `attention_impl='cudnn'` on devices without cuDNN's fused attention, before anything
  is compiled (XLA's own error comes from deep inside the first step's compilation).

  Raises:
    ConfigError: naming the devices and the implementations that would run.
  """
  for device in devices:
    if device.platform != "gpu":
      raise ConfigError(f"model.attention_impl='cudnn' needs an NVIDIA GPU (cuDNN's fused attention); "
                        f"this run's devices are {device.platform.upper()}s: use 'dot_product' (XLA's "
                        "choice) or 'einsum'")
    if not supports_cudnn_attention(device):
      minimum = ".".join(map(str, CUDNN_ATTENTION_MIN_CAPABILITY))
      raise ConfigError(f"model.attention_impl='cudnn' needs a GPU of compute capability {minimum} or "
                        f"newer (cuDNN's fused attention); this run's {device.device_kind} has "
                        f"{device.compute_capability}: use 'dot_product' (XLA's choice) or 'einsum'")
