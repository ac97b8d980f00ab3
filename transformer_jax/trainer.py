"""The training loop: steps, metrics, checkpoints, validation, the time budget and preemption.

`train` runs the jitted step of a `steps.Setup` over an input pipeline and does everything around
it in Python: it restores the latest checkpoint (state and data position) or initialises, logs
metrics, saves checkpoints, runs validation, and stops on the step count, the time budget or
SIGTERM, agreed on by every process at the same step. Dropout keys are
`fold_in(dropout_key, step)`, so a resumed run draws the keys a straight run would have drawn.
With `train.cooldown_fraction` it also places the learning-rate cooldown, by steps or aimed at the
end of the time budget, in the train state (so a resumed run follows the plan it saved).
"""

from __future__ import annotations

import collections
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
from transformer_jax.optim import NO_COOLDOWN, cooldown_fraction
from transformer_jax.steps import Setup, TrainState, root_keys

log = logging.getLogger(__name__)


class StopRequests:
  """SIGTERM (preemption) and the time budget, agreed on by every process at the same step.

  `reason` is what stopped training ("sigterm" or "time"), once `check` has said so;
  `cooldown_due` says whether the last `cooldown_s` of the budget have begun.
  """

  def __init__(self, time_budget_s: float, cooldown_s: float = 0.0):
    self.deadline = time.monotonic() + time_budget_s if time_budget_s > 0 else math.inf
    self.cooldown_from = self.deadline - cooldown_s if cooldown_s > 0 else math.inf
    self.sigterm = False
    self.reason: str | None = None
    self.cooldown_due = False
    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  @classmethod
  def for_run(cls, train: ml_collections.ConfigDict) -> StopRequests:
    """The time budget of `train.time_budget_minutes`, whose last `train.cooldown_fraction` is the
    cooldown."""
    budget_s = 60.0 * train.time_budget_minutes
    return cls(budget_s, budget_s * cooldown_fraction(train))

  def _on_sigterm(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.sigterm = True

  def check(self) -> str | None:
    """'sigterm', 'time' or None; every process gets the same answer (a collective)."""
    now = time.monotonic()
    local = np.array([self.sigterm, now >= self.deadline, now >= self.cooldown_from])
    if jax.process_count() > 1:
      local = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 3).any(axis=0)
    self.reason = "sigterm" if local[0] else "time" if local[1] else None
    self.cooldown_due = bool(local[2])
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


def _progress(total: int, initial: int):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=2.0,
              disable=jax.process_index() != 0,
              bar_format="{l_bar}{bar}| step {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]")


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
  iterator = iter(pipeline.make_dataset(batches, num_workers=config.data.num_workers))
  if restored is None:
    state = setup.init_state(config.seed, initial_params() if initial_params else None)
  else:
    state, data_state = restored
    iterator.set_state(data_state)
    log.info("Resumed from step %d in %s.", int(state.step), manager.directory)
  dropout_key = root_keys(config.seed)[1]
  own_stop = stop is None
  stop = StopRequests.for_run(train_cfg) if own_stop else stop
  # The metrics' clock starts with the budget (creating the writer takes a second or two).
  writer = MetricWriter(workdir)
  peak = peak_flops_per_device(setup.model_config.dtype, config.train.peak_flops)

  step = first_step = int(jax.device_get(state.step))
  last_saved = manager.latest_step()
  state, plan = _place_cooldown(setup, state, step, train_cfg)
  end_step = min(train_cfg.num_steps, plan[1])
  progress = _progress(end_step, step)
  # (step, time) at the last sync points: the recent pace. The end of the first step (after its
  # compilation) is the first, so that a cooldown due at the first sync point has a pace.
  marks = collections.deque(maxlen=30)
  pending: list[dict] = []  # Device-side metrics since the last log, fetched together.
  flops, window_start = 0.0, time.perf_counter()
  sync_every = min(10, train_cfg.log_every)
  reason = None

  def flush_metrics() -> None:
    nonlocal pending, flops, window_start
    if not pending:
      return
    fetched = jax.device_get(pending)
    history = [{"step": step - len(fetched) + i + 1, "loss": float(m["loss"]) / max(float(m["tokens"]), 1.0)}
               for i, m in enumerate(fetched)]
    check_finite_losses(history, last_saved)
    elapsed = time.perf_counter() - window_start
    tokens = sum(float(m["tokens"]) for m in fetched)
    summary = {
        "loss": sum(float(m["loss"]) for m in fetched) / max(tokens, 1.0),
        "accuracy": sum(float(m["correct"]) for m in fetched) / max(tokens, 1.0),
        "learning_rate": float(fetched[-1]["learning_rate"]),
        "grad_norm": float(np.mean([float(m["grad_norm"]) for m in fetched])),
        "target_tokens_per_s": tokens / elapsed,
        "steps_per_s": len(fetched) / elapsed,
    }
    if peak > 0:
      summary["mfu"] = flops / elapsed / (peak * jax.device_count())
    writer.write(step, "train", summary)
    # Time left: by steps at the current rate, or by the time budget, whichever ends first.
    left = (end_step - step) / summary["steps_per_s"]
    left = min(left, max(0.0, stop.deadline - time.monotonic()))
    progress.total = min(end_step, step + int(left * summary["steps_per_s"]))
    progress.set_postfix_str(
        f"loss {summary['loss']:.3f} lr {summary['learning_rate']:.2e} "
        f"{summary['target_tokens_per_s']:,.0f} tok/s" + (f" mfu {summary['mfu']:.1%}" if peak > 0 else "")
        + f" left {int(left // 60)}:{int(left % 60):02d}", refresh=False)
    pending, flops, window_start = [], 0.0, time.perf_counter()

  def save() -> None:
    nonlocal last_saved
    flush_metrics()  # Never checkpoint a state whose loss has gone non-finite,
    if last_saved != step:
      checkpoints.check_finite(state, last_saved)  # nor non-finite parameters.
      checkpoints.save(manager, state, iterator.get_state(), config)
      last_saved = step

  try:
    while step < end_step:
      local = next(iterator)
      n, src_len = local["src"].shape
      flops += train_step_flops(setup.model_config, n * jax.process_count(), src_len,
                                   local["tgt"].shape[1])
      state, metrics = setup.train_step(state, setup.put_batch(local), dropout_key)
      if pending:
        # At most two steps in flight: the host prepares the next batch while the device runs,
        # without queueing an unbounded number of steps (and their batches) ahead.
        jax.block_until_ready(pending[-1])
      pending.append(metrics)
      step += 1
      progress.update(1)
      if step % train_cfg.log_every == 0:
        flush_metrics()
      if step % train_cfg.checkpoint_every == 0:
        save()
      if evaluate is not None and step % train_cfg.eval_every == 0:
        flush_metrics()
        writer.write(step, "validation", evaluate(state.params, step))
        window_start = time.perf_counter()
      if step == first_step + 1:
        jax.block_until_ready(metrics)
        marks.append((step, time.perf_counter()))
      if step % sync_every == 0:
        marks.append((step, time.perf_counter()))
        if reason := stop.check():
          break
        if stop.cooldown_due and setup.cools and (plan[2] or plan[0] > step):
          state, plan = _aim_cooldown(setup, state, step, plan, marks, stop.deadline, train_cfg.num_steps)
          end_step = plan[1]
    save()
    if reason == "sigterm":
      log.warning("Stopped by SIGTERM at step %d; the checkpoint is saved.", step)
    elif reason == "time":
      log.info("Time budget of %.1f min reached at step %d.", train_cfg.time_budget_minutes, step)
    elif step < train_cfg.num_steps:
      log.info("The cooldown ended at step %d.", step)
    if evaluate is not None and step % train_cfg.eval_every != 0 and reason != "sigterm":
      writer.write(step, "validation", evaluate(state.params, step))
  finally:
    progress.close()
    manager.wait_until_finished()
    manager.close()
    if own_stop:
      stop.close()
    writer.close()
  return state


def _place_cooldown(setup: Setup, state: TrainState, step: int, train_cfg: ml_collections.ConfigDict
                    ) -> tuple[TrainState, tuple[int, int, int]]:
  """The state with its cooldown placed, and the plan on the host (`NO_COOLDOWN` for a run
  without one). A cooldown aimed at a time budget that has begun is kept as saved (a resumed run
  finishes it bit for bit); otherwise it covers the last `cooldown_fraction` of `num_steps` as
  configured now (a time budget may bring it forward later)."""
  if not setup.cools:
    return state, NO_COOLDOWN
  # The plan is replicated: any local copy will do.
  saved = tuple(int(x) for x in np.asarray(state.cooldown.addressable_data(0)))
  if saved[2] and saved[0] <= step:
    if step >= saved[1]:
      log.info("This run's cooldown ended at step %d with its time budget; there is nothing left "
               "to train (to train on from here, set train.cooldown_fraction=0).", saved[1])
    return state, saved
  plan = (round((1.0 - cooldown_fraction(train_cfg)) * train_cfg.num_steps), train_cfg.num_steps, 0)
  return (state if plan == saved else setup.with_cooldown(state, *plan)), plan


def _aim_cooldown(setup: Setup, state: TrainState, step: int, plan: tuple[int, int, int],
                  marks: collections.deque, deadline: float, num_steps: int
                  ) -> tuple[TrainState, tuple[int, int, int]]:
  """Aims the cooldown's end at the end of the time budget, at the pace of the last few hundred
  steps (validation and checkpoints included): the cooldown starts now unless the one planned by
  steps ends the run first. Once started it is re-aimed at every sync point, so that a machine
  that slows down or speeds up still reaches rate 0 with the budget: the rate falls from where it
  is at another slope. Process 0's estimate is every process's.

  Returns the state and the plan on the host.
  """
  (s0, t0), (s1, t1) = marks[0], marks[-1]
  if s1 <= s0:
    return state, plan
  left = max(0.0, deadline - time.monotonic())
  end = min(num_steps, step + max(1, round((s1 - s0) / (t1 - t0) * left)))
  if jax.process_count() > 1:
    end = int(multihost_utils.broadcast_one_to_all(np.int32(end)))
  aimed = bool(plan[2])  # Placed by this process's budget already (a resumed plan ends before that).
  if not aimed and end >= plan[1]:  # The cooldown by steps ends the run first.
    return state, plan
  if not aimed:
    log.info("Cooldown: the learning rate falls linearly to 0 from step %d to about step %d, where "
             "the time budget ends at %.2f steps/s.", step, end, (s1 - s0) / (t1 - t0))
    first = step
  elif end == plan[1]:
    return state, plan
  else:  # A new slope from the rate reached so far: the rate never jumps, up or down.
    reached = (plan[1] - step) / (plan[1] - plan[0])
    first = end - round((end - step) / max(reached, 1e-6))
  return setup.with_cooldown(state, first, end, True), (first, end, 1)
