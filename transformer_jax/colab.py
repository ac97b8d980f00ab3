"""Colab: what the notebooks' first cell runs, and the links that open them there.

Colab's runtimes come with their own jax (0.7.2 in late 2026) and, on GPU runtimes, the CUDA plugin
built for it; on TPU runtimes, the libtpu for it. Installing this package upgrades jax and jaxlib
but not the plugin, which JAX then ignores ("not compatible with the installed jaxlib version ...
will not be used"): a notebook would train on the CPU without stopping. `setup` installs the build
that matches the runtime (the package's `cuda12` or `tpu` extra), asks for a restart only when that
install replaced a module the session had already imported, and stops if JAX still runs on the CPU
of a GPU or TPU runtime. `notebook_settings` then picks what suits the devices.

The repository's URL is REPO_URL (TRANSFORMER_JAX_REPO_URL overrides it). The notebooks need it
before the package is installed, so they carry it as text, as the README and the notebooks carry
their "Open in Colab" links: `python -m transformer_jax.colab` writes all of them from it, and
tests/test_colab.py checks that they agree.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from transformer_jax import accelerators
from transformer_jax.errors import UserError

# The project has no public URL yet: put the real one here (then `python -m transformer_jax.colab`).
REPO_URL = "https://github.com/OWNER/transformer_jax"
REPO_BRANCH = "main"
EXTRAS = {accelerators.GPU: "cuda12", accelerators.TPU: "tpu"}  # What each runtime adds to jax.
TOKENS_PER_ACCELERATOR = 16_384  # Per side, small config: fits the smallest Colab GPU (a 15 GB T4).
DRIVE_MOUNT = "/content/drive"
DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops=true"
_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
_COLAB_LINK = re.compile(
    r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/[\w.-]+/notebooks/")
_CLONE_LINE = re.compile(r'(REPO_URL = os\.environ\.get\("TRANSFORMER_JAX_REPO_URL", ")[^"]*("\))')


class RestartRequired(UserError, RuntimeError):
  """The install replaced modules this session had imported; the message says what to do."""


def repo_url() -> str:
  """The repository to clone: TRANSFORMER_JAX_REPO_URL, else REPO_URL."""
  return os.environ.get("TRANSFORMER_JAX_REPO_URL", REPO_URL)


def colab_url(notebook: str) -> str:
  """The address that opens notebooks/`notebook` of the repository in Colab."""
  owner_and_name = repo_url().removeprefix("https://github.com/").removesuffix(".git")
  return f"https://colab.research.google.com/github/{owner_and_name}/blob/{REPO_BRANCH}/notebooks/{notebook}"


def badge(notebook: str) -> str:
  """The Markdown "Open in Colab" badge for notebooks/`notebook`."""
  return f"[![Open in Colab]({_BADGE})]({colab_url(notebook)})"


def _rewrite(text: str) -> str:
  text = _COLAB_LINK.sub(colab_url(""), text)
  return _CLONE_LINE.sub(lambda m: m.group(1) + repo_url() + m.group(2), text)


def sync_links(root: str | os.PathLike, *, write: bool = True) -> list[pathlib.Path]:
  """Writes `repo_url()` into the Colab links of README.md, docs/notebooks.md and
  notebooks/*.ipynb and into the notebooks' clone line.

  Args:
    root: the repository's root.
    write: False only lists the files that disagree.

  Returns:
    The files that were (or would be) changed.
  """
  root = pathlib.Path(root)
  changed = []
  documents = [path for path in (root / "README.md", root / "docs" / "notebooks.md") if path.exists()]
  for path in [*documents, *sorted((root / "notebooks").glob("*.ipynb"))]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":  # Cell by cell, written back as nbformat writes (byte for byte).
      notebook = json.loads(text)
      for cell in notebook["cells"]:
        cell["source"] = _rewrite("".join(cell["source"])).splitlines(keepends=True)
      new = json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    else:
      new = _rewrite(text)
    if new != text:
      changed.append(path)
      if write:
        path.write_text(new, encoding="utf-8")
  return changed


def on_colab() -> bool:
  """Whether this is a Colab runtime (its kernel imports google.colab before any cell runs)."""
  return "google.colab" in sys.modules


def install_command(runtime: str, repo_dir: str | os.PathLike) -> list[str] | None:
  """The pip command that gives a Colab runtime the jax build for its accelerator.

  Args:
    runtime: "gpu", "tpu" or "cpu".
    repo_dir: the clone, which the notebook has installed plainly already.

  Returns:
    `pip install <repo_dir>[cuda12]` on a GPU (jax's CUDA 12 build within the package's jax
    range), `[tpu]` on a TPU (the libtpu for that jax); None on a CPU, which needs nothing more.
  """
  if runtime not in EXTRAS:
    return None
  return [sys.executable, "-m", "pip", "install", "-q", f"{repo_dir}[{EXTRAS[runtime]}]"]


def distribution_versions() -> dict[str, str]:
  """Every installed distribution's version, by name (to see what an install changed)."""
  return {dist.metadata["Name"]: dist.version for dist in importlib.metadata.distributions()}


def modules_of(distribution: str) -> set[str]:
  """The dotted names of the modules `distribution` installs (its .py files and extensions)."""
  names = set()
  for file in importlib.metadata.distribution(distribution).files or ():
    if file.parts[0] == ".." or file.suffix not in (".py", ".so", ".pyd"):
      continue  # Scripts outside site-packages, data.
    parts = [*file.parts[:-1], file.name.split(".")[0]]
    names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
  return names


def stale_modules(before: Mapping[str, str], after: Mapping[str, str],
                  imported: Mapping[str, Any] | None = None) -> list[str]:
  """The imported modules whose distribution an install upgraded or replaced.

  A new CUDA plugin does not make a restart necessary: JAX loads plugins when its backends start,
  so one installed before that is found. libtpu is imported by `import jax` itself, so a new one
  is only seen after a restart.
  """
  imported = sys.modules if imported is None else imported
  changed = [name for name, version in after.items() if before.get(name) not in (None, version)]
  return sorted(module for name in changed for module in modules_of(name) if module in imported)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What `setup` found and did.

  Attributes:
    runtime: "gpu", "tpu" or "cpu", by the host's device files and Colab's variables.
    on_colab: whether this is Colab (elsewhere nothing is installed).
    command: the pip command run (recorded only, in a dry run), or None.
  """

  runtime: str
  on_colab: bool
  command: list[str] | None


def install(repo_dir: str | os.PathLike, *, dry_run: bool = False, root: str | os.PathLike = "/",
            environ: Mapping[str, str] | None = None) -> Setup:
  """On Colab, installs the jax build for the runtime's accelerator; elsewhere, nothing.

  Args:
    repo_dir: the clone the notebook installed.
    dry_run: record the command without running it (the tests).
    root: as for `accelerators.host_accelerator`.
    environ: as for `accelerators.host_accelerator`.

  Raises:
    RestartRequired: the install replaced a module the session had imported.
  """
  runtime = accelerators.host_accelerator(root, environ) or "cpu"
  command = install_command(runtime, repo_dir) if on_colab() else None
  if command and not dry_run:
    print(f"A {runtime.upper()} runtime: installing the jax build for it: {shlex.join(command)}")
    before = distribution_versions()
    subprocess.run(command, check=True)
    importlib.invalidate_caches()
    if stale := stale_modules(before, distribution_versions()):
      raise RestartRequired(
          f"the install replaced modules this session had imported ({', '.join(stale[:5])}): restart "
          "the session (Runtime > Restart session), then run the notebook again from the top; this "
          "cell will find everything installed and go on")
  return Setup(runtime, on_colab(), command)


def setup(repo_dir: str | os.PathLike, *, deterministic: bool = False, dry_run: bool = False,
          root: str | os.PathLike = "/", environ: Mapping[str, str] | None = None) -> Setup:
  """The notebooks' first step: `install`, then a check that JAX uses the runtime's accelerator.

  Args:
    repo_dir: the clone the notebook installed.
    deterministic: make a GPU's reductions deterministic (XLA_FLAGS), for notebook 3's bit-exact
      resume; GPUs otherwise sum some gradients in a varying order.
    dry_run: as for `install`.
    root: as for `install`.
    environ: as for `install`.

  Raises:
    RestartRequired: as `install`.
    accelerators.AcceleratorError: a GPU or TPU runtime whose JAX runs on the CPU.
  """
  done = install(repo_dir, dry_run=dry_run, root=root, environ=environ)
  if deterministic and done.runtime == accelerators.GPU:
    flags = os.environ.get("XLA_FLAGS", "")
    if DETERMINISTIC_GPU_FLAG not in flags:  # Before JAX starts its backends, which read it.
      os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_GPU_FLAG}".strip()
  accelerators.check_backend(strict=True, root=root, environ=environ)
  import jax

  print(f"JAX {jax.__version__} on {accelerators.describe_devices(jax.devices())}")
  return done


@dataclasses.dataclass(frozen=True)
class NotebookSettings:
  """What suits the devices a notebook trains on.

  Attributes:
    backend: "cpu", "gpu" or "tpu".
    dtype: the compute dtype: bfloat16 on a GPU or TPU (float32 parameters, loss and softmax
      stay), float32 on a CPU, where bfloat16 products are slower.
    attention_impl: "cudnn" on GPUs of compute capability 8.0 or newer, else "einsum".
    tokens_per_batch: TOKENS_PER_ACCELERATOR per GPU or TPU device; None keeps the config's.
  """

  backend: str
  dtype: str
  attention_impl: str
  tokens_per_batch: int | None

  def apply(self, config: Any, *, attention: bool = True) -> None:
    """Sets model.dtype, data.tokens_per_batch and, with `attention`, model.attention_impl (False
    where a notebook reads the einsum attention's weights)."""
    config.model.dtype = self.dtype
    if attention:
      config.model.attention_impl = self.attention_impl
    if self.tokens_per_batch:
      config.data.tokens_per_batch = self.tokens_per_batch


def notebook_settings(devices: Sequence[Any] | None = None) -> NotebookSettings:
  """The settings for `devices` (default `jax.devices()`)."""
  if devices is None:
    import jax

    devices = jax.devices()
  backend = devices[0].platform
  if backend == "cpu":
    return NotebookSettings("cpu", "float32", "einsum", None)
  cudnn = backend == accelerators.GPU and all(map(accelerators.supports_cudnn_attention, devices))
  return NotebookSettings(backend, "bfloat16", "cudnn" if cudnn else "einsum",
                          TOKENS_PER_ACCELERATOR * len(devices))


def runs_dir(default: str | os.PathLike, *, use_drive: bool) -> pathlib.Path:
  """The notebooks' run directory: on Google Drive when asked in Colab (mounting it; Colab asks
  for permission), so a run outlives the runtime and a new session resumes it; else `default`."""
  if use_drive and on_colab():
    from google.colab import drive  # Colab's own module.

    drive.mount(DRIVE_MOUNT)
    return pathlib.Path(DRIVE_MOUNT) / "MyDrive" / "transformer_jax" / "runs"
  if use_drive:
    print(f"Google Drive is for Colab; the runs stay in {default}")
  return pathlib.Path(default)


if __name__ == "__main__":
  for changed in sync_links(sys.argv[1] if len(sys.argv) > 1 else "."):
    print(f"rewrote the links in {changed}")
