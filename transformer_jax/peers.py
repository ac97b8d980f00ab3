"""When a process of a multi-process run is lost: every other one stops promptly, with one line.

Two signals tell that a process is gone. A collective whose peer died fails at once, in the
process that waits on it (`Gloo all-reduce failed: ... Connection reset by peer`): the training
loop passes such an error to `Watch.lost_error` (`is_peer_failure` recognises it). A process that
is alive but silent (stopped, hung, swapping) fails nothing: the others would wait for it in their
next collective forever. So while training runs, a `Watch` thread in each process writes a
heartbeat counter into the coordination service's key-value store, and another reads everyone's:
a process whose counter stands still for `timeout_s`, or a coordination service that does not
answer that long, is lost.

Not the coordination service's own heartbeat: when it notices a silent process, jaxlib ends every
other process with a C++ abort (`client.h:80] Terminating process because the JAX distributed
service detected fatal errors`, then a stack dump, exit status -6), and the callback that would
replace that abort (`missed_heartbeat_callback`) fails with `std::bad_cast` when it is Python's, in
jaxlib 0.10. So `distributed.initialize` gives the service a longer timeout
(`distributed.service_heartbeat_timeout`) and the watch acts first. One loss still ends in that
abort: process 0 killed outright, for it hosts the service, whose end the others' jaxlib notices
at once.

Stopping: the process that sees the loss first writes its message into the store as the stop
word; every watch reads it and exits with the same line and `EXIT_CODE`, without shutting
jax.distributed down (that would wait for the lost process). Process 0 leaves last, once the
others have said they are leaving (or after a few seconds), because its exit ends the service.
Heartbeats and the stop word are read only while `train` runs: preparing data may hold the GIL for
minutes (SentencePiece), which would silence the heartbeats of a healthy process.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from transformer_jax import distributed
from transformer_jax.errors import EXIT_RETRYABLE, UserError, show_tracebacks

log = logging.getLogger(__name__)

EXIT_CODE = EXIT_RETRYABLE
_KEYS = "transformer_jax/peers"
_FINISHED = "finished"  # A heartbeat's last value: this process left the watch on purpose.
# What a collective or the coordination service says when a peer is gone (jaxlib's CPU collectives
# are Gloo's; NCCL's and the service's status codes for the GPU and TPU runtimes).
_PEER_FAILURES = ("Gloo", "Connection reset by peer", "Connection closed by peer", "NCCL",
                  "UNAVAILABLE:", "DEADLINE_EXCEEDED:", "heartbeat", "Barrier failed", "barrier")


class PeerLostError(UserError, RuntimeError):
  """Another process of the run was lost; rerunning the same command resumes.

  The process cannot shut jax.distributed down cleanly (that waits for every process), so
  `errors.run_command` ends it at once after printing the message (`exit_at_once`).
  """

  exit_code = EXIT_CODE
  exit_at_once = True


def is_peer_failure(error: BaseException) -> bool:
  """Whether `error`, raised in a run of several processes, says that a peer is gone."""
  return jax.process_count() > 1 and any(text in str(error) for text in _PEER_FAILURES)


def _exit(message: str) -> None:
  """Prints `program: error: message` as `errors.run_command` does, and ends the process."""
  if show_tracebacks():
    faulthandler.dump_traceback(all_threads=True)
  # On a line of its own: a progress bar may have left the cursor mid-line.
  print(f"\n{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  logging.shutdown()
  os._exit(EXIT_CODE)


class Watch:
  """Heartbeats of every process while training runs; a lost process stops them all.

  `start` it before the work that needs every process (restoring, steps, evaluation, saves) and
  `close` it after. `where()` says where the run stands, for the message: when the process was
  lost ("at step 12") and what the run resumes from ("checkpoint 8 in gs://b/run/checkpoints").
  """

  def __init__(self, timeout_s: float, where: Callable[[], tuple[str, str]]):
    self.timeout_s = float(timeout_s)
    self.where = where
    self.me, self.count = jax.process_index(), jax.process_count()
    self.interval = min(5.0, max(0.5, self.timeout_s / 20))
    self._client = distributed.coordination_client()
    self._stop = threading.Event()
    self._leaving = threading.Lock()  # Held by whichever thread stops the run.
    now = time.monotonic()
    self._answered = now  # When the coordination service last answered.
    # peer -> (its last counter, when it last changed). A peer that has not beaten yet gets
    # twice the bound: processes enter training a few seconds apart.
    self._seen: dict[int, tuple[str | None, float]] = {
        p: (None, now + self.timeout_s) for p in range(self.count) if p != self.me}
    self._word: str | None = None
    self._threads = [threading.Thread(target=self._beat, name="peers-beat", daemon=True),
                     threading.Thread(target=self._check, name="peers-check", daemon=True)]

  def start(self) -> Watch:
    if self.count > 1:
      for thread in self._threads:
        thread.start()
    return self

  def close(self) -> None:
    """Stops watching, and tells the others that this process stopped beating on purpose."""
    if self._stop.is_set():
      return
    self._stop.set()
    if self.count > 1 and not self._leaving.locked():
      try:
        self._client.key_value_set(f"{_KEYS}/beat/{self.me}", _FINISHED, allow_overwrite=True)
      except Exception:  # The service is gone; nobody is left to read it.
        pass

  def _beat(self) -> None:
    beats = 0
    while not self._stop.wait(self.interval):
      beats += 1
      try:
        self._client.key_value_set(f"{_KEYS}/beat/{self.me}", str(beats), allow_overwrite=True)
        entries = self._client.key_value_dir_get(f"{_KEYS}/")
      except Exception:  # The service does not answer: `_check` counts how long.
        continue
      now = self._answered = time.monotonic()
      for key, value in entries:
        kind, _, who = key[len(_KEYS) + 1:].partition("/")
        if kind == "stop":
          self._word = value
        elif kind == "beat" and int(who) in self._seen and self._seen[int(who)][0] != value:
          self._seen[int(who)] = (value, now)

  def _check(self) -> None:
    while not self._stop.wait(self.interval / 2):
      if self._word is not None:
        self._leave(self._word)
      now = time.monotonic()
      if self.me != 0 and now - self._answered > self.timeout_s:
        self._stop_run(self._message(0, f"the coordination service it hosts has not answered for "
                                        f"{self.timeout_s:g} s: stopped, hung or dead"),
                       service_lost=True)
      for peer, (value, since) in self._seen.items():
        if value != _FINISHED and now - since > self.timeout_s:
          self._stop_run(self._message(peer, f"no heartbeat for {self.timeout_s:g} s: stopped, "
                                             "hung or dead"))

  def _silent_peers(self) -> list[int]:
    now = time.monotonic()
    return [p for p, (value, since) in self._seen.items()
            if value not in (None, _FINISHED) and now - since > 2 * self.interval]

  def _message(self, peer: int | None, reason: str) -> str:
    who = f"process {peer} of {self.count}" if peer is not None else "another process"
    at, resumes_from = self.where()
    command = shlex.join(sys.argv)
    command = f"python {command}" if sys.argv[0].endswith(".py") else command
    return (f"{who} was lost {at} ({reason}); every process stops (exit status {EXIT_CODE}, "
            f"retryable). Running the same command again on every process resumes the run from "
            f"{resumes_from} (this process ran: {command})")

  def lost_error(self, error: BaseException) -> PeerLostError:
    """The error to raise for a collective that failed because a peer is gone; the other
    processes are told to stop too. Names the lost process when it is known: the other one of
    two, or one whose heartbeat stopped within a couple of heartbeats."""
    if self.count == 2:
      peers = [1 - self.me]
    else:
      deadline = time.monotonic() + min(5.0, 3 * self.interval)
      while not (peers := self._silent_peers()) and time.monotonic() < deadline:
        time.sleep(self.interval / 4)
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    message = self._message(peers[0] if len(peers) == 1 else None, f"a collective failed: {reason}")
    self._leaving.acquire()  # If the watch is already leaving, it ends the process meanwhile.
    self._stop.set()
    self._broadcast(message)
    return PeerLostError(message)

  def _stop_run(self, message: str, service_lost: bool = False) -> None:
    if self._leaving.acquire(blocking=False):
      if not service_lost:
        self._broadcast(message)
      _exit(message)

  def _leave(self, word: str) -> None:
    if self._leaving.acquire(blocking=False):
      self._bounded(lambda: self._client.key_value_set(f"{_KEYS}/left/{self.me}", "1",
                                                      allow_overwrite=True), 1.0)
      _exit(word)

  def _broadcast(self, message: str) -> None:
    """Writes the stop word; on process 0, then waits (a few seconds at most) until the others
    have read it and left, since its exit ends the coordination service."""
    self._bounded(lambda: self._client.key_value_set(f"{_KEYS}/stop", message, allow_overwrite=True),
                  2.0)
    if self.me != 0:
      return
    deadline = time.monotonic() + 2 * self.interval + 2.0
    lost = set(self._silent_peers())
    while time.monotonic() < deadline:
      left = self._bounded(lambda: self._client.key_value_dir_get(f"{_KEYS}/left/"), 1.0) or []
      if len({int(k.rsplit("/", 1)[1]) for k, _ in left} | lost) >= self.count - 2:
        break  # All but this process and the lost one have left.
      time.sleep(0.1)

  @staticmethod
  def _bounded(call: Callable[[], Any], timeout_s: float) -> Any:
    """`call()` in a thread of its own, waited for `timeout_s` at most (a coordination service
    that stopped answering would hold a call until its RPC deadline); None if it did not answer."""
    result = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else None
