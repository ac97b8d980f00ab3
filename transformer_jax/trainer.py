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

import logging
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from transformer_jax import checkpoints, paths, peers
from transformer_jax.data import pipeline
from transformer_jax.errors import StorageError
from transformer_jax.flops import peak_flops_per_device
from transformer_jax.goodput import Goodput
from transformer_jax.metrics import MetricsWindow, MetricWriter, read_metrics
from transformer_jax.cooldown import Cooldown
from transformer_jax.steps import Setup, TrainState, root_keys
from transformer_jax.validation import ValidationWatch

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


def train(config: ml_collections.ConfigDict, workdir: str, setup: Setup, batches: pipeline.EpochBatches,
          evaluate: Callable[[Any, int], dict] | None = None,
          stop: StopRequests | None = None,
          initial_params: Callable[[], Any] | None = None,
          started: float | None = None) -> TrainState:
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
    started: `time.monotonic()` when this attempt started, for goodput (what came before this
      call counts as startup); default: now.

  Raises:
    NonFiniteError: if a loss or the state became NaN or Inf; nothing non-finite is saved.
    CheckpointError: if the run has checkpoints and none of them restores.
    StorageError: if a checkpoint or the metrics could not be written, even after retries.
    PeerLostError: if another process of the run was lost (`peers`); a process that is silent
      for `train.heartbeat_timeout_seconds` ends this one from the watch's thread instead.

  Returns:
    The final train state (also saved as the last checkpoint).
  """
  train_cfg = config.train
  workdir = paths.resolve(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  goodput = Goodput(started, previous=(read_metrics(workdir, "goodput") or [None])[-1])
  position = _Position(workdir)
  watch = peers.Watch(train_cfg.heartbeat_timeout_seconds, position).start()
  try:
    with goodput.time("checkpoints"):
      manager, restored = checkpoints.restore_for_training(workdir, train_cfg, setup)
  except Exception as e:
    if peers.is_peer_failure(e):
      raise watch.lost_error(e) from e
    watch.close()
    raise
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
  step = first_step = position.step = int(jax.device_get(state.step))
  last_saved = manager.latest_step()
  cooldown = Cooldown.for_run(train_cfg, stop.deadline)
  if cooldown:
    state = cooldown.place(state, step)
  end_step = min(train_cfg.num_steps, cooldown.end_step) if cooldown else train_cfg.num_steps
  watch_validation = ValidationWatch(workdir, train_cfg, step) if evaluate is not None else None
  if watch_validation and watch_validation.should_stop():
    log.info("This run stopped early at its last validation pass (train.early_stopping_passes); "
             "there is nothing left to train.")
    end_step = step
  progress = _progress(end_step, step)
  sync_every = min(10, train_cfg.log_every)  # Processes agree on stopping every this many steps.
  train_loss = None  # The last logged training loss, beside each validation pass.
  skip_closing = False
  goodput.start_training()

  try:
    while step < end_step:
      begin = time.monotonic()
      local = next(data)
      batch = setup.put_batch(local)
      goodput.add("data", time.monotonic() - begin)
      begin = time.monotonic()
      state, metrics = setup.train_step(state, batch, dropout_key)
      window.add(metrics, local)
      step += 1
      if step == first_step + 1:  # Compiled and run: the first step is compilation time.
        jax.block_until_ready(metrics)
      goodput.add(goodput.step_part(step, first=step == first_step + 1), time.monotonic() - begin)
      position.step = step
      progress.update(1)
      if step % train_cfg.log_every == 0:
        train_loss = _log_window(window, writer, goodput, progress, step, last_saved,
                                 end_step, stop.deadline) or train_loss
      if step % train_cfg.checkpoint_every == 0:
        train_loss = _log_window(window, writer, goodput, progress, step, last_saved,
                                 end_step, stop.deadline) or train_loss
        with goodput.time("checkpoints"):
          manager, last_saved = _save(manager, state, data, config, step, last_saved)
      if evaluate is not None and step % train_cfg.eval_every == 0:
        train_loss = _log_window(window, writer, goodput, progress, step, last_saved,
                                 end_step, stop.deadline) or train_loss
        with goodput.time("evaluation"):
          metrics = evaluate(state.params, step)
          writer.write(step, "validation", metrics)
          window.restart_clock()
          if watch_validation.after_pass(step, metrics, state.params, train_loss):
            break
      if cooldown and step == first_step + 1:  # The pace's first mark: the first step compiled.
        cooldown.mark(step)
      if step % sync_every == 0:
        if cooldown:
          cooldown.mark(step)
        if stop.check():
          break
        if cooldown:
          state = cooldown.aim(state, step)
          end_step = cooldown.end_step
    _log_window(window, writer, goodput, progress, step, last_saved, end_step, stop.deadline)
    with goodput.time("checkpoints"):
      manager, last_saved = _save(manager, state, data, config, step, last_saved, wait=True)
    if stop.reason == "sigterm":
      log.warning("Stopped by SIGTERM at step %d; the checkpoint is saved.", step)
    elif stop.reason == "time":
      log.info("Time budget of %.1f min reached at step %d.", train_cfg.time_budget_minutes, step)
    elif step < train_cfg.num_steps:
      log.info("The cooldown ended at step %d.", step)
    if (evaluate is not None and step % train_cfg.eval_every != 0 and stop.reason != "sigterm"
        and step > first_step):
      with goodput.time("evaluation"):
        metrics = evaluate(state.params, step)
        writer.write(step, "validation", metrics)
        watch_validation.after_pass(step, metrics, state.params, train_loss)
    writer.write(step, "goodput", goodput.record(ended=stop.reason or "steps"))
    if jax.process_index() == 0:
      log.info("%s", goodput.summary())
  except Exception as e:
    # Closing the manager waits for every process (it would wait for a lost one), and a manager
    # whose saves kept failing is closed already (and would raise its error again).
    skip_closing = isinstance(e, StorageError) or peers.is_peer_failure(e)
    if peers.is_peer_failure(e):
      raise watch.lost_error(e) from e
    raise
  finally:
    watch.close()
    progress.close()
    if not skip_closing:
      manager.wait_until_finished()
      manager.close()
    if own_stop:
      stop.close()
    writer.close()
  return state


class _Position:
  """Where training stands, for the message of a lost process (`peers.Watch` calls it from its
  thread): the last step done, and the checkpoint the run would resume from."""

  def __init__(self, workdir: paths.epath.Path):
    self.workdir = workdir
    self.step: int | None = None

  def __call__(self) -> tuple[str, str]:
    at = "before training started" if self.step is None else f"after step {self.step}"
    complete = checkpoints.saved_steps(self.workdir)
    if not complete:
      return at, "its start (no checkpoint is complete)"
    return at, f"checkpoint {complete[-1]} in {self.workdir / 'checkpoints'}"


def _save(manager, state: TrainState, data, config: ml_collections.ConfigDict, step: int,
          last_saved: int | None, wait: bool = False) -> tuple[Any, int]:
  """Saves the state and the data position as checkpoint `step`, unless it is saved already
  (with `wait`, waits until every save is written); the manager to use from now on (a new one
  after a retry) and the last step saved. Call it after the window's losses are logged (and so
  checked): nothing non-finite is saved."""
  if last_saved != step:
    checkpoints.check_finite(state, last_saved)
  if last_saved != step or wait:
    manager = checkpoints.save_retrying(manager, state, data.get_state(), config, wait=wait,
                                        saving=last_saved == step)
  return manager, step


def _log_window(window: MetricsWindow, writer: MetricWriter, goodput: Goodput, progress, step: int,
                last_saved: int | None, end_step: int, deadline: float) -> float | None:
  """Writes the window's summary and the goodput so far, and shows the summary on the progress
  bar, with the time left: by steps at the current rate, or by the time budget, whichever ends
  first. Returns its loss (None if the window was empty)."""
  summary = window.summary(step, last_saved)
  if summary is None:
    return None
  writer.write(step, "train", summary)
  writer.write(step, "goodput", goodput.record())
  rate = summary["steps_per_s"]
  left = min((end_step - step) / rate, max(0.0, deadline - time.monotonic()))
  progress.total = min(end_step, step + int(left * rate))
  progress.set_postfix_str(
      f"loss {summary['loss']:.3f} lr {summary['learning_rate']:.2e} "
      f"{summary['target_tokens_per_s']:,.0f} tok/s"
      + (f" mfu {summary['mfu']:.1%}" if "mfu" in summary else "")
      + f" left {int(left // 60)}:{int(left % 60):02d}", refresh=False)
  return summary["loss"]


def _progress(total: int, initial: int):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=2.0,
              disable=jax.process_index() != 0,
              bar_format="{l_bar}{bar}| step {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]")
