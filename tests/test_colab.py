"""The notebooks' setup: on a (made-up) Colab runtime it installs the jax build for a GPU or TPU
and nothing more on a CPU, asks for a restart only when an imported module was replaced, refuses a
GPU runtime whose JAX runs on the CPU, and picks settings for the devices; the repository's URL
has one home, from which the README's and the notebooks' links are written."""

import json
import os
import pathlib
import sys
import types
from types import SimpleNamespace

import pytest

from transformer_jax import colab
from transformer_jax.accelerators import AcceleratorError

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REPO = "/content/transformer_jax"


@pytest.fixture
def on_colab(monkeypatch):
  """A fake google.colab (the Colab kernel imports it before any cell); drive.mount is recorded."""
  mounted = []
  module = types.ModuleType("google.colab")
  module.drive = SimpleNamespace(mount=mounted.append)
  monkeypatch.setitem(sys.modules, "google.colab", module)
  return mounted


def runtime_root(tmp_path, kind):
  """A made-up host: dev/ of a GPU runtime, a TPU runtime, or neither."""
  files = {"gpu": ["dev/nvidia0"], "tpu": ["dev/accel0"], "cpu": []}[kind]
  for name in files:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).touch()
  return tmp_path


@pytest.mark.parametrize("kind, extra", [("gpu", "cuda12"), ("tpu", "tpu"), ("cpu", None)])
def test_colab_installs_the_jax_build_for_its_runtime(on_colab, tmp_path, kind, extra):
  done = colab.install(REPO, dry_run=True, root=runtime_root(tmp_path, kind), environ={})
  assert done.runtime == kind and done.on_colab
  if extra is None:
    assert done.command is None  # The notebook's plain install was all a CPU runtime needs.
  else:
    assert done.command == [sys.executable, "-m", "pip", "install", "-q", f"{REPO}[{extra}]"]


def test_the_extras_it_installs_pull_jax_builds_within_the_package_range():
  import tomllib
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  jax_range = next(d for d in project["dependencies"] if d.startswith("jax>"))[len("jax"):]
  extras = project["optional-dependencies"]
  assert extras["cuda12"] == [f"jax[cuda12]{jax_range}"] and extras["tpu"] == [f"jax[tpu]{jax_range}"]
  assert extras["cuda13"] == [f"jax[cuda13]{jax_range}"]
  assert any(d.startswith("gcsfs") for d in extras["gcs"])


def test_off_colab_nothing_is_installed(tmp_path):
  assert "google.colab" not in sys.modules
  done = colab.install(REPO, dry_run=True, root=runtime_root(tmp_path, "gpu"), environ={})
  assert done.command is None and not done.on_colab


@pytest.mark.parametrize("kind", ["gpu", "tpu"])
def test_an_accelerator_runtime_on_the_cpu_backend_is_refused(on_colab, tmp_path, kind):
  # This machine's JAX runs on the CPU: as on a GPU runtime whose CUDA plugin JAX ignored.
  name = {"gpu": "an NVIDIA GPU", "tpu": "a TPU"}[kind]
  with pytest.raises(AcceleratorError, match=f"has {name} but JAX runs on the CPU.*\\[{colab.EXTRAS[kind]}\\]"):
    colab.setup(REPO, dry_run=True, root=runtime_root(tmp_path, kind), environ={})


def test_a_cpu_runtime_passes_and_prints_its_devices(on_colab, tmp_path, capsys):
  done = colab.setup(REPO, dry_run=True, root=runtime_root(tmp_path, "cpu"), environ={})
  assert done.runtime == "cpu" and done.command is None
  assert "JAX " in capsys.readouterr().out


def test_determinism_is_asked_of_a_gpu_only(on_colab, tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  with pytest.raises(AcceleratorError):  # This CPU fails the check after the flag is set.
    colab.setup(REPO, deterministic=True, dry_run=True, root=runtime_root(tmp_path, "gpu"), environ={})
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {colab.DETERMINISTIC_GPU_FLAG}"
  monkeypatch.setenv("XLA_FLAGS", "")
  colab.setup(REPO, deterministic=True, dry_run=True, root=runtime_root(tmp_path / "cpu", "cpu"), environ={})
  assert os.environ["XLA_FLAGS"] == ""


def test_a_restart_is_asked_only_for_replaced_modules_already_imported():
  before = {"jax": "0.10.2", "libtpu": "0.0.21.1", "jax-cuda12-plugin": "0.7.2", "numpy": "2.0.2"}
  after = {**before, "libtpu": "0.0.42.1", "jax-cuda12-plugin": "0.10.2", "jax-cuda12-pjrt": "0.10.2"}
  modules = {"libtpu": {"libtpu"}, "jax-cuda12-plugin": {"jax_plugins.xla_cuda12"}}
  imported = {"jax": None, "libtpu": None, "jax_plugins": None, "numpy": None}  # As `import jax` leaves it.
  with pytest.MonkeyPatch.context() as m:
    m.setattr(colab, "modules_of", lambda name: modules[name])
    assert colab.stale_modules(before, after, imported) == ["libtpu"]
    del imported["libtpu"]  # A GPU runtime: the new plugin is found when the backends start.
    assert colab.stale_modules(before, after, imported) == []


def test_modules_of_a_distribution_are_read_from_its_files():
  assert {"pytest", "_pytest.config"} <= colab.modules_of("pytest")


@pytest.mark.parametrize("devices, expected", [
    ([SimpleNamespace(platform="cpu", device_kind="cpu")], colab.NotebookSettings("cpu", "float32", "einsum", None)),
    ([SimpleNamespace(platform="gpu", device_kind="NVIDIA A100", compute_capability="8.0")],
     colab.NotebookSettings("gpu", "bfloat16", "cudnn", colab.TOKENS_PER_ACCELERATOR)),
    ([SimpleNamespace(platform="gpu", device_kind="Tesla T4", compute_capability="7.5")],
     colab.NotebookSettings("gpu", "bfloat16", "einsum", colab.TOKENS_PER_ACCELERATOR)),
    ([SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")] * 4,
     colab.NotebookSettings("tpu", "bfloat16", "einsum", 4 * colab.TOKENS_PER_ACCELERATOR)),
], ids=["cpu", "a100", "t4", "tpu_v5e_4"])
def test_notebook_settings_suit_the_devices(devices, expected):
  assert colab.notebook_settings(devices) == expected


def test_settings_apply_to_a_config():
  from transformer_jax.config import load_config_file
  config = load_config_file(ROOT / "configs" / "small.py")
  colab.NotebookSettings("gpu", "bfloat16", "cudnn", 32_768).apply(config, attention=False)
  assert (config.model.dtype, config.model.attention_impl, config.data.tokens_per_batch) == (
      "bfloat16", "einsum", 32_768)
  colab.NotebookSettings("cpu", "float32", "einsum", None).apply(config)
  assert config.data.tokens_per_batch == 32_768  # None keeps the config's batch.


def test_runs_go_to_google_drive_only_when_asked_in_colab(on_colab, tmp_path):
  assert colab.runs_dir(tmp_path, use_drive=False) == tmp_path and on_colab == []
  assert colab.runs_dir(tmp_path, use_drive=True) == pathlib.Path("/content/drive/MyDrive/transformer_jax/runs")
  assert on_colab == [colab.DRIVE_MOUNT]


def test_off_colab_drive_is_not_mounted(tmp_path, capsys):
  assert colab.runs_dir(tmp_path, use_drive=True) == tmp_path
  assert "Google Drive is for Colab" in capsys.readouterr().out


def test_the_readme_and_notebooks_carry_links_written_from_the_one_url(monkeypatch):
  monkeypatch.delenv("TRANSFORMER_JAX_REPO_URL", raising=False)
  assert colab.sync_links(ROOT, write=False) == []  # `python -m transformer_jax.colab` writes them.
  readme = (ROOT / "README.md").read_text()
  guide = (ROOT / "docs" / "notebooks.md").read_text()
  for path in NOTEBOOKS:
    cells = json.loads(path.read_text())["cells"]
    assert colab.badge(path.name) in "".join(cells[0]["source"]), path.name
    assert f'"TRANSFORMER_JAX_REPO_URL", "{colab.REPO_URL}")' in "".join(cells[1]["source"]), path.name
    assert colab.colab_url(path.name) in readme and colab.colab_url(path.name) in guide, path.name


def test_a_new_url_rewrites_every_link(tmp_path, monkeypatch):
  (tmp_path / "notebooks").mkdir()
  for path in [ROOT / "README.md", *NOTEBOOKS]:
    (tmp_path / path.relative_to(ROOT)).write_text(path.read_text())
  monkeypatch.setenv("TRANSFORMER_JAX_REPO_URL", "https://github.com/someone/fork")
  assert len(colab.sync_links(tmp_path)) == 1 + len(NOTEBOOKS)
  for path in NOTEBOOKS:
    text = (tmp_path / "notebooks" / path.name).read_text()
    assert "OWNER" not in text and "colab.research.google.com/github/someone/fork/blob/main/notebooks/" in text
    assert '\\"TRANSFORMER_JAX_REPO_URL\\", \\"https://github.com/someone/fork\\")' in text
    json.loads(text)
  assert colab.sync_links(tmp_path) == []
