"""The training loop: steps, metrics, checkpoints, validation, the time budget and preemption.

`train` runs the jitted step of a `steps.Setup` over an input pipeline and does everything around
it in Python: it restores the latest checkpoint (state and data position) or initialises, logs
metrics, saves checkpoints, runs validation, and stops on the step count, the time budget or
SIGTERM, agreed on by every process at the same step. Dropout keys are
`fold_in(dropout_key, step)`, so a resumed run draws the keys a straight run would have drawn.
A run that asks for a learning-rate cooldown (`train.cooldown_fraction`) has it placed and aimed
at the time budget by `cooldown.Cooldown` at the points where the processes synchronise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from transformer_jax import checkpoints, paths
from transformer_jax.errors import NonFiniteError
from transformer_jax.data import pipeline
from transformer_jax.flops import peak_flops_per_device, train_step_flops
from transformer_jax.cooldown import Cooldown
from transformer_jax.steps import Setup, TrainState, root_keys

log = logging.getLogger(__name__)


class StopRequests:
  """SIGTERM (preemption) and the time budget, agreed on by every process at the same step.

  `reason` is what stopped training ("sigterm" or "time"), once `check` has said so.
  """

  def __init__(self, time_budget_s: float):
    self.deadline = time.monotonic() + time_budget_s if time_budget_s > 0 else math.inf
    self.sigterm = False
    self.reason: str | None = None
    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  @classmethod
  def for_run(cls, train: ml_collections.ConfigDict) -> StopRequests:
    """The time budget of `train.time_budget_minutes`, counted from now."""
    return cls(60.0 * train.time_budget_minutes)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.sigterm = True

  def check(self) -> str | None:
    """'sigterm', 'time' or None; every process gets the same answer (a collective)."""
    local = np.array([self.sigterm, time.monotonic() >= self.deadline])
    if jax.process_count() > 1:
      local = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2).any(axis=0)
    self.reason = "sigterm" if local[0] else "time" if local[1] else None
    return self.reason

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


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


def train(config: ml_collections.ConfigDict, workdir: str, setup: Setup, batches,
          evaluate: Callable[[Any, int], dict] | None = None,
          stop: StopRequests | None = None,
          initial_params: Callable[[], Any] | None = None) -> TrainState:
  """Runs (or resumes) training until `config.train.num_steps`, the time budget, or SIGTERM.

  Args:
    config: the run config.
    workdir: the run directory; checkpoints go to `workdir/checkpoints`.
    setup: from `steps.make_setup(config)`.
    batches: a `data.pipeline.EpochBatches` (random access to this process's rows of each batch).
    evaluate: called as `evaluate(params, step)` every `train.eval_every` steps and at the end
      (not after SIGTERM); returns metrics to log under "validation".
    stop: the stop requests to honour, whose `reason` then says why training stopped; by
      default SIGTERM and `train.time_budget_minutes`, counted from this call.
    initial_params: returns the parameters to start from (fine-tuning) instead of a fresh
      initialisation; called only when the run has no checkpoint to resume.

  Raises:
    NonFiniteError: if a loss or the state became NaN or Inf; nothing non-finite is saved.
    CheckpointError: if the run has checkpoints and none of them restores.

  Returns:
    The final train state (also saved as the last checkpoint).
  """
  train_cfg = config.train
  workdir = paths.resolve(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  manager, restored = checkpoints.restore_for_training(workdir, train_cfg, setup)
  data = iter(pipeline.make_dataset(batches, num_workers=config.data.num_workers))
  if restored is None:
    state = setup.init_state(config.seed, initial_params() if initial_params else None)
  else:
    state, data_state = restored
    data.set_state(data_state)
    log.info("Resumed from step %d in %s.", int(state.step), manager.directory)
  dropout_key = root_keys(config.seed)[1]
  own_stop = stop is None
  stop = StopRequests.for_run(train_cfg) if own_stop else stop
  writer = MetricWriter(workdir)  # Its clock starts with the budget's.
  window = MetricsWindow(setup.model_config,
                         peak_flops_per_device(setup.model_config.dtype, train_cfg.peak_flops))
  step = first_step = int(jax.device_get(state.step))
  last_saved = manager.latest_step()
  cooldown = Cooldown.for_run(train_cfg, stop.deadline)
  if cooldown:
    state = cooldown.place(state, step)
  end_step = min(train_cfg.num_steps, cooldown.end_step) if cooldown else train_cfg.num_steps
  progress = _progress(end_step, step)
  sync_every = min(10, train_cfg.log_every)  # Processes agree on stopping every this many steps.

  try:
    while step < end_step:
      local = next(data)
      state, metrics = setup.train_step(state, setup.put_batch(local), dropout_key)
      window.add(metrics, local)
      step += 1
      progress.update(1)
      if step % train_cfg.log_every == 0:
        _log_window(window, writer, progress, step, last_saved, end_step, stop.deadline)
      if step % train_cfg.checkpoint_every == 0:
        _log_window(window, writer, progress, step, last_saved, end_step, stop.deadline)
        last_saved = _save(manager, state, data, config, step, last_saved)
      if evaluate is not None and step % train_cfg.eval_every == 0:
        _log_window(window, writer, progress, step, last_saved, end_step, stop.deadline)
        writer.write(step, "validation", evaluate(state.params, step))
        window.restart_clock()
      if cooldown and step == first_step + 1:  # The pace's first mark: the first step compiled.
        jax.block_until_ready(metrics)
        cooldown.mark(step)
      if step % sync_every == 0:
        if cooldown:
          cooldown.mark(step)
        if stop.check():
          break
        if cooldown:
          state = cooldown.aim(state, step)
          end_step = cooldown.end_step
    _log_window(window, writer, progress, step, last_saved, end_step, stop.deadline)
    last_saved = _save(manager, state, data, config, step, last_saved)
    if stop.reason == "sigterm":
      log.warning("Stopped by SIGTERM at step %d; the checkpoint is saved.", step)
    elif stop.reason == "time":
      log.info("Time budget of %.1f min reached at step %d.", train_cfg.time_budget_minutes, step)
    elif step < train_cfg.num_steps:
      log.info("The cooldown ended at step %d.", step)
    if evaluate is not None and step % train_cfg.eval_every != 0 and stop.reason != "sigterm":
      writer.write(step, "validation", evaluate(state.params, step))
  finally:
    progress.close()
    manager.wait_until_finished()
    manager.close()
    if own_stop:
      stop.close()
    writer.close()
  return state


def _save(manager, state: TrainState, data, config: ml_collections.ConfigDict, step: int,
          last_saved: int | None) -> int:
  """Saves the state and the data position as checkpoint `step`, unless it is saved already;
  the last step saved. Call it after the window's losses are logged (and so checked): nothing
  non-finite is saved."""
  if last_saved != step:
    checkpoints.check_finite(state, last_saved)
    checkpoints.save(manager, state, data.get_state(), config)
  return step


def _log_window(window: MetricsWindow, writer: MetricWriter, progress, step: int,
                last_saved: int | None, end_step: int, deadline: float) -> None:
  """Writes the window's summary and shows it on the progress bar, with the time left: by steps
  at the current rate, or by the time budget, whichever ends first."""
  summary = window.summary(step, last_saved)
  if summary is None:
    return
  writer.write(step, "train", summary)
  rate = summary["steps_per_s"]
  left = min((end_step - step) / rate, max(0.0, deadline - time.monotonic()))
  progress.total = min(end_step, step + int(left * rate))
  progress.set_postfix_str(
      f"loss {summary['loss']:.3f} lr {summary['learning_rate']:.2e} "
      f"{summary['target_tokens_per_s']:,.0f} tok/s"
      + (f" mfu {summary['mfu']:.1%}" if "mfu" in summary else "")
      + f" left {int(left // 60)}:{int(left % 60):02d}", refresh=False)


def _progress(total: int, initial: int):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=2.0,
              disable=jax.process_index() != 0,
              bar_format="{l_bar}{bar}| step {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]")
