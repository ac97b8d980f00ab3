"""Errors that are the user's to fix: a bad config value, a malformed input file, a damaged or
missing checkpoint. Their messages name the field, file and line, or checkpoint, and say what
would be accepted; the command-line programs print them without a traceback (`run_command`) and exit
with `exit_code`, keeping tracebacks for real bugs.

Each class also derives from the built-in exception a caller would expect (ValueError,
FileNotFoundError), so `except ValueError` keeps working.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable


# EX_TEMPFAIL of sysexits.h: a failure that running the same command again may not meet (a lost
# process, storage that kept failing); the run resumes from its last checkpoint. Schedulers can be
# told to retry on it (docs/checkpoints.md).
EXIT_RETRYABLE = 75


class UserError(Exception):
  """Something the user can fix; the message says what and where."""

  exit_code = 2  # As for a usage error; 1 is left for failures of the run itself.
  # The process cannot end normally (its peers are gone and jax.distributed's shutdown would wait
  # for them): `run_command` ends it as soon as the message is printed.
  exit_at_once = False


class ConfigError(UserError, ValueError):
  """A config value that is not accepted; the message names the field and what is."""


class DataError(UserError, ValueError):
  """Input data that cannot be used: the message names the file (and line) or the split."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user named does not exist."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that cannot be used: missing, damaged, or holding non-finite values."""


class StorageError(UserError, OSError):
  """A file or object that could not be written, even after retries; the message names it."""

  exit_code = EXIT_RETRYABLE


class NonFiniteError(UserError, FloatingPointError):
  """Training diverged (a NaN or Inf loss or parameter); nothing non-finite was saved."""

  exit_code = 1


def run_command(program: str, body: Callable[[], int | None]) -> int:
  """Runs a command-line program's body. A UserError is printed as `program: error: message` to
  standard error, without a traceback, and gives its exit status; other exceptions (bugs) keep
  theirs. TRANSFORMER_JAX_TRACEBACK=1 shows the traceback of user errors too. An error that
  cannot wait for a normal exit (`exit_at_once`: a lost peer) ends the process once printed.

  Returns:
    The body's exit status (0 if it returns None), or the user error's.
  """
  try:
    return body() or 0
  except UserError as e:
    if show_tracebacks():
      if not e.exit_at_once:
        raise
      traceback.print_exc()
    print(f"{program}: error: {e}", file=sys.stderr, flush=True)
    if e.exit_at_once:
      sys.stdout.flush()
      logging.shutdown()
      os._exit(e.exit_code)
    return e.exit_code


def show_tracebacks() -> bool:
  """Whether TRANSFORMER_JAX_TRACEBACK asks for the tracebacks of user errors."""
  return os.environ.get("TRANSFORMER_JAX_TRACEBACK", "0") not in ("", "0")
