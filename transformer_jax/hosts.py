"""Work one process does for all: process 0 prepares, the others wait for its word, then read.

A multi-process run shares its data directory and workdir; downloading, preparing and tokenizing a
corpus once there is enough, and several processes doing it at once would only compete for the
same files. `once` runs a step on process 0 while the others wait, with a log line saying what they
wait for and a timeout that names it. The word travels through jax.distributed's key-value store
(the coordination service every multi-process run has): "done", or the error process 0 met, so a
waiting process stops with process 0's reason instead of waiting out its timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import jax

from transformer_jax import distributed
from transformer_jax.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
_DONE = "done"


class WaitError(UserError, TimeoutError):
  """Process 0 did not finish preparing in time, or failed; says which step."""


def once(name: str, step: Callable[[], T], *, timeout_minutes: float,
         after: Callable[[], T] | None = None) -> T:
  """Runs `step()` on process 0; every other process waits until it has, then runs `after()`
  (default: `step()` again, which finds the work done and only reads it).

  Args:
    name: what is prepared, for the log, the error and the store's key ("the train split").
    step: the work, on process 0.
    timeout_minutes: how long the others wait.
    after: what the other processes run once process 0 is done.

  Raises:
    WaitError: on a waiting process, if process 0 failed or did not finish in time.
  """
  if jax.process_count() == 1:
    return step()
  client = distributed.coordination_client()  # Stops at once if the run has no coordinator.
  key = f"transformer_jax/prepared/{name}"
  if jax.process_index() == 0:
    try:
      result = step()
    except BaseException as e:
      client.key_value_set(key, f"process 0 failed: {type(e).__name__}: {str(e)[:500]}")
      raise
    client.key_value_set(key, _DONE)
    return result
  log.info("Waiting for process 0 to prepare %s (at most %g minutes).", name, timeout_minutes)
  try:
    word = client.blocking_key_value_get(key, int(timeout_minutes * 60_000))
  except Exception as e:  # The client's deadline error.
    raise WaitError(f"process {jax.process_index()} waited {timeout_minutes:g} minutes for process 0 "
                    f"to prepare {name}, in vain (data.prepare_timeout_minutes): {e}") from e
  if word != _DONE:
    raise WaitError(f"process 0 could not prepare {name}: {word}")
  return (after or step)()
