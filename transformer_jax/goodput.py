"""Goodput as MaxText reports it: the share of a run's wall time spent in productive training steps,
and where the rest went.

A run's wall time is split into parts that add up to it exactly:

| part | what it counts |
|---|---|
| steps | training steps done for the first time (the productive time) |
| compilation | the first step of each attempt: tracing and compiling the step, then running it |
| data | waiting for the next batch and putting it on the devices |
| checkpoints | restoring at the start, and the part of each save the loop waits for |
| evaluation | validation passes (loss, greedy BLEU, keeping the best parameters) |
| redone | steps done again after a resume: those between the restored checkpoint and the last step the previous attempt recorded |
| startup | from the attempt's start to its first step, less restoring: data preparation, initialisation |
| between_runs | from the last record of an attempt that crashed or was preempted to the next attempt's start: the work lost after that record and the time no process ran |
| other | the rest: logging, the stop vote, the loop itself |

Goodput is steps / wall time. Each attempt (a run started again with the same workdir) carries the
totals on: the training loop writes a "goodput" line (`Goodput.record`: the cumulative seconds of
every part) to `metrics.jsonl` at each log of the training metrics, and the next attempt starts
from the last one. Steps are timed on the host: a step's time is from its batch being on the devices to
the previous step being done (at most two are in flight), so a device still busy while the host
waits for data counts as data time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

PARTS = ("steps", "compilation", "data", "checkpoints", "evaluation", "redone", "startup",
         "between_runs", "other")
# How an attempt ended, in its last record: None while it runs (a crash leaves it so).
_DELIBERATE_ENDS = ("steps", "time")  # Ends the next attempt does not count the gap after.


class Goodput:
  """Where a run's time goes: this attempt's, added to the totals of the attempts before it.

  Args:
    started: `time.monotonic()` when this attempt started (what came before `train` counts as
      startup); default: now.
    previous: the last "goodput" record of the run's metrics.jsonl, or None for a first attempt.
  """

  def __init__(self, started: float | None = None, previous: dict | None = None):
    self.started = time.monotonic() if started is None else started
    self.seconds = dict.fromkeys(PARTS, 0.0)
    self.before = {part: float(previous.get(f"{part}_s", 0.0)) for part in PARTS} if previous else None
    self.attempts = int(previous.get("attempts", 0)) + 1 if previous else 1
    # Steps up to this one were done (and recorded) by an earlier attempt.
    self.redo_until = int(previous["step"]) if previous else 0
    if previous and previous.get("ended") not in _DELIBERATE_ENDS:
      self.seconds["between_runs"] = max(0.0, time.time() - (time.monotonic() - self.started)
                                         - float(previous.get("time", 0.0)))

  def add(self, part: str, seconds: float) -> None:
    self.seconds[part] += seconds

  @contextlib.contextmanager
  def time(self, part: str) -> Iterator[None]:
    """Counts the time of the `with` block as `part`."""
    start = time.monotonic()
    try:
      yield
    finally:
      self.add(part, time.monotonic() - start)

  def step_part(self, step: int, first: bool) -> str:
    """The part that step `step` (counted from 1) belongs to."""
    return "compilation" if first else "redone" if step <= self.redo_until else "steps"

  def start_training(self) -> None:
    """Ends the startup: what this attempt spent so far outside the parts measured."""
    measured = sum(v for k, v in self.seconds.items() if k not in ("startup", "between_runs"))
    self.seconds["startup"] = max(0.0, time.monotonic() - self.started - measured)

  def totals(self) -> dict[str, float]:
    """Seconds per part over every attempt so far, "other" making them add up to the wall time."""
    elapsed = time.monotonic() - self.started
    seconds = dict(self.seconds)
    seconds["other"] = max(0.0, elapsed - sum(v for k, v in seconds.items()
                                              if k not in ("other", "between_runs")))
    if self.before:
      seconds = {part: seconds[part] + self.before[part] for part in PARTS}
    return seconds

  def record(self, ended: str | None = None) -> dict:
    """The metrics.jsonl fields: `PART_s` for each part, `wall_s`, `goodput`, `attempts`,
    `time` (Unix time) and `ended` (None while the attempt runs)."""
    seconds = self.totals()
    wall = sum(seconds.values())
    return {**{f"{part}_s": round(seconds[part], 3) for part in PARTS}, "wall_s": round(wall, 3),
            "goodput": round(seconds["steps"] / wall, 4) if wall > 0 else 0.0,
            "attempts": self.attempts, "time": round(time.time(), 3), "ended": ended}

  def summary(self) -> str:
    """One line: goodput, the wall time and its parts in minutes."""
    record = self.record()
    parts = ", ".join(f"{part.replace('_', ' ')} {record[f'{part}_s'] / 60:.2f}" for part in PARTS)
    return (f"Goodput {record['goodput']:.1%} of {record['wall_s'] / 60:.2f} min over "
            f"{self.attempts} attempt{'s' if self.attempts > 1 else ''} (minutes: {parts}).")
