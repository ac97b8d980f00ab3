"""Run directories that may be local or on an object store (gs://, s3://), through etils.epath.

A TPU pod's hosts share a bucket, not a disk, so a workdir such as `gs://bucket/runs/base` must
work wherever the run reads or writes it: the tokenizer, the token caches, the metrics, the test
output (orbax and tfds take epath paths themselves). Local paths are made absolute; URIs are kept
as they are (`os.path.abspath("gs://b/x")` would make a local directory named "gs:").

Object stores have no atomic rename and no appending: `write_bytes_atomic` writes a temporary
object and moves it into place (readers never see half a file: an object appears when its upload
completes), and `AppendLog` rewrites a small log whole where appending is not possible. Memory
mapping needs a local file, so `local_copy` mirrors a remote directory to the host's disk once.
A write that fails is tried again a few times (`retrying`: object stores fail for a moment), then
stops the run with a `StorageError` naming the file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from etils import epath

from transformer_jax.errors import StorageError

PathLike = str | os.PathLike
WRITE_ATTEMPTS = 3  # A failed write is tried this many times in all, 1 s and then 2 s apart.


def retrying(what: str, write: Callable[[], Any], attempts: int = WRITE_ATTEMPTS) -> Any:
  """`write()`, tried again after 1 s, 2 s, ... while it raises an OSError, `attempts` times in all.

  Raises:
    StorageError: naming `what` (the path) and the last error.
  """
  for attempt in range(1, attempts + 1):
    try:
      return write()
    except OSError as e:
      if attempt == attempts:
        raise StorageError(f"writing {what} failed {attempts} times, the last with "
                           f"{type(e).__name__}: {e}; the run stops") from e
      time.sleep(2.0 ** (attempt - 1))
  raise AssertionError("attempts must be >= 1")


def is_remote(path: PathLike) -> bool:
  """Whether `path` names an object store ("scheme://...") rather than the local filesystem."""
  return "://" in os.fspath(path) and not os.fspath(path).startswith("file://")


def resolve(path: PathLike) -> epath.Path:
  """The path as an epath.Path: URIs unchanged, local paths absolute."""
  path = os.fspath(path)
  if path.startswith("file://"):
    path = path[len("file://"):]
  return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file, so a run killed mid-write leaves no
  truncated file (locally an atomic rename; on an object store the object appears whole)."""
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
  tmp.write_bytes(data)
  tmp.replace(path)


def write_text_atomic(path: PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))


class AppendLog:
  """A text file that grows by lines: appended to locally, rewritten whole on object stores
  (which cannot append; the metrics of a run are small)."""

  def __init__(self, path: PathLike):
    self.path = resolve(path)
    self._remote = is_remote(self.path)
    if self._remote:
      self._lines = self.path.read_text() if self.path.exists() else ""
    else:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")

  def write(self, line: str) -> None:
    """Adds `line`, tried again a few times if the write fails (`retrying`).

    Raises:
      StorageError: naming the file, if every try failed.
    """
    if self._remote:
      self._lines += line
      retrying(os.fspath(self.path), lambda: self.path.write_text(self._lines))
    else:
      retrying(os.fspath(self.path), lambda: (self._file.write(line), self._file.flush()))

  def close(self) -> None:
    if not self._remote:
      self._file.close()


def local_copy(path: PathLike, cache_root: PathLike | None = None) -> str:
  """A local directory holding the files of directory `path`: `path` itself when it is local,
  else a copy under `cache_root` (default: the system's temporary directory), made once per host
  and reused, for what must be memory-mapped."""
  path = resolve(path)
  if not is_remote(path):
    return os.fspath(path)
  root = os.fspath(cache_root) if cache_root else os.path.join(tempfile.gettempdir(), "transformer_jax")
  digest = hashlib.sha256(os.fspath(path).encode()).hexdigest()[:12]
  local = os.path.join(root, f"{path.name}-{digest}")
  if not os.path.isdir(local):
    tmp = f"{local}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for item in path.iterdir():
      with item.open("rb") as src, open(os.path.join(tmp, item.name), "wb") as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)
    try:
      os.replace(tmp, local)  # Another process on this host may have copied it first.
    except OSError:
      shutil.rmtree(tmp, ignore_errors=True)
  return local
