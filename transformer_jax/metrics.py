"""A run's metrics: the train step's since the last log (`MetricsWindow`), written to
`workdir/metrics.jsonl` and TensorBoard (`MetricWriter`), and read back (`read_metrics`)."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from transformer_jax import paths
from transformer_jax.errors import NonFiniteError
from transformer_jax.flops import train_step_flops


def check_finite_losses(history: list[dict], last_saved: int | None) -> None:
  """Raises NonFiniteError at the first NaN or Inf loss of `history`."""
  for metrics in history:
    if not np.isfinite(metrics["loss"]):
      raise NonFiniteError(
          f"the training loss became {metrics['loss']} at step {metrics['step']}; stopping. The last "
          f"good checkpoint (step {last_saved}) is kept. Lower the learning rate, enable "
          "--config.train.grad_clip_norm, or check the data.")


class MetricWriter:
  """Metrics to `workdir/metrics.jsonl` (one JSON object a line) and TensorBoard event files;
  only process 0 writes. Every line also holds "minutes": the run's wall-clock time since its
  first step was prepared, continued from the lines already there when a run resumes (so time to
  quality counts the time lost to preemption, as MLPerf's does)."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self._start = time.perf_counter()
    self._minutes_before = 0.0
    if self.active:
      from tensorboardX import SummaryWriter  # Pure Python: no TensorFlow needed (gs:// and s3://
      # need google-cloud-storage or boto3).
      workdir = paths.resolve(workdir)
      self._minutes_before = max((r.get("minutes", 0.0) for r in read_metrics(workdir)), default=0.0)
      self._jsonl = paths.AppendLog(workdir / "metrics.jsonl")
      self._tb = SummaryWriter(os.fspath(workdir / "tensorboard"))

  def minutes(self) -> float:
    return self._minutes_before + (time.perf_counter() - self._start) / 60

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self.active:
      return
    self._jsonl.write(json.dumps({"step": step, "split": split, **metrics,
                                  "minutes": round(self.minutes(), 3)}) + "\n")
    for name, value in metrics.items():
      if isinstance(value, (int, float)) and np.isfinite(value):
        self._tb.add_scalar(f"{split}/{name}", value, step)
    self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """The lines of `workdir/metrics.jsonl` (those of `split` only, if given); [] if there is none.
  A line cut short by a crash is skipped."""
  path = paths.resolve(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if split is None or record.get("split") == split:
      records.append(record)
  return records


class MetricsWindow:
  """The train step's metrics since the last log, kept on the device and fetched together (a
  fetch waits for the device), with the FLOPs of their batches for MFU."""

  def __init__(self, model_config, peak_flops_per_device: float):
    self.model_config = model_config
    self.peak = peak_flops_per_device
    self.pending: list[dict] = []
    self.flops = 0.0
    self.start = time.perf_counter()

  def add(self, metrics: dict, local_batch: dict[str, np.ndarray]) -> None:
    """A step's metrics; waits for the step before it, so that at most two are in flight: the
    host prepares the next batch while the device runs, without queueing steps (and their
    batches) ahead without bound."""
    if self.pending:
      jax.block_until_ready(self.pending[-1])
    self.pending.append(metrics)
    rows, src_len = local_batch["src"].shape
    self.flops += train_step_flops(self.model_config, rows * jax.process_count(), src_len,
                                   local_batch["tgt"].shape[1])

  def restart_clock(self) -> None:
    """Starts the window's time afresh (after validation, which is not training time)."""
    self.start = time.perf_counter()

  def summary(self, step: int, last_saved: int | None) -> dict[str, float] | None:
    """The window's loss, accuracy, rate, gradient norm, throughput and MFU (None if empty), and
    a new window.

    Raises:
      NonFiniteError: at the window's first NaN or Inf loss.
    """
    if not self.pending:
      return None
    fetched = jax.device_get(self.pending)
    check_finite_losses([{"step": step - len(fetched) + i + 1,
                          "loss": float(m["loss"]) / max(float(m["tokens"]), 1.0)}
                         for i, m in enumerate(fetched)], last_saved)
    elapsed = time.perf_counter() - self.start
    tokens = sum(float(m["tokens"]) for m in fetched)
    summary = {
        "loss": sum(float(m["loss"]) for m in fetched) / max(tokens, 1.0),
        "accuracy": sum(float(m["correct"]) for m in fetched) / max(tokens, 1.0),
        "learning_rate": float(fetched[-1]["learning_rate"]),
        "grad_norm": float(np.mean([float(m["grad_norm"]) for m in fetched])),
        "target_tokens_per_s": tokens / elapsed,
        "steps_per_s": len(fetched) / elapsed,
    }
    if self.peak > 0:
      summary["mfu"] = self.flops / elapsed / (self.peak * jax.device_count())
    self.pending, self.flops = [], 0.0
    self.restart_clock()
    return summary
