"""Checkpoints with orbax: the train state, the data position and the config, saved
asynchronously; restoring onto any mesh; averaging the last N (section 6.1).

Layout: `WORKDIR/checkpoints/STEP/{state,data,config}`; the tokenizer is `WORKDIR/tokenizer.model`.

A checkpoint is trusted only if it restores and every floating-point value in it is finite.
Non-finite states are never saved (`check_finite`). When training resumes and the newest
checkpoint does not restore (a truncated file, a missing metadata file, an empty directory) or
holds non-finite values, `restore_for_training` says which and why, moves it to
`WORKDIR/damaged_checkpoints/` and resumes from the newest one that restores; with none that
restores it stops rather than start from scratch.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from transformer_jax import paths, peers
from transformer_jax.errors import CheckpointError, ConfigError, NonFiniteError, StorageError
from transformer_jax.optim import cooldown_fraction, find_cooldown
from transformer_jax.steps import Setup, TrainState

log = logging.getLogger(__name__)


def make_manager(workdir: str, train: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Asynchronous orbax checkpoints under `workdir/checkpoints`, keeping the last K (and at least
  as many as averaging needs). orbax writes each step into a temporary directory and renames it
  when complete, so a crash mid-save leaves the previous checkpoints as they were."""
  keep = max(int(train.checkpoints_to_keep), int(train.checkpoints_to_average))
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(paths.resolve(workdir) / "checkpoints", options=options)


def saved_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints in `workdir/checkpoints` (complete ones: orbax names temporary
  directories otherwise), ascending; [] if there are none."""
  directory = paths.resolve(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree: Any) -> bool:
  """Whether every floating-point value of a (possibly sharded) pytree is finite.

  One jitted reduction, compiled once per tree structure (not at every checkpoint).
  """
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return True
  return bool(np.asarray(_all_finite(leaves).addressable_data(0)))


def check_finite(state: TrainState, last_saved: int | None) -> None:
  """Raises NonFiniteError unless the parameters and optimiser state are all finite."""
  if not all_finite((state.params, state.opt_state)):
    step = int(jax.device_get(state.step))
    kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
            else "no checkpoint was saved before")
    raise NonFiniteError(
        f"the parameters or optimiser state became non-finite (NaN or Inf) by step {step}; they "
        f"are not saved and the run stops ({kept}). Lower the learning rate, raise "
        "train.adam_eps, enable train.grad_clip_norm, or check the data.")


def save(manager: ocp.CheckpointManager, state: TrainState, data_state: dict,
         config: ml_collections.ConfigDict) -> None:
  """Saves the train state, the data iterator's position and the config at `state.step`."""
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)


def save_retrying(manager: ocp.CheckpointManager, state: TrainState, data_state: dict,
                  config: ml_collections.ConfigDict, *, wait: bool = False,
                  saving: bool = False, attempts: int = paths.WRITE_ATTEMPTS) -> ocp.CheckpointManager:
  """Saves as `save` does (with `wait`, until it is written), trying again when it fails. With
  `saving`, the state's step is being saved already: the first try only waits for it.

  A write to an object store can fail for a moment. orbax reports a failed asynchronous save at
  the next save or wait, and then at every call, so a retry closes the manager, opens a new one
  (which removes the half-written step) and saves the state it has now. Every process retries
  together: they agree on whether any of them failed.

  Returns:
    The manager to use from now on (a new one after a retry).

  Raises:
    StorageError: after `attempts` failures, naming the directory, the error and the newest
      complete checkpoint (which the failed saves left as it was).
  """
  step = int(jax.device_get(state.step))
  first_reason = None
  for attempt in itertools.count(1):
    error = None
    try:
      if attempt > 1 or not saving:
        save(manager, state, data_state, config)
      if wait:
        manager.wait_until_finished()
    except Exception as e:  # orbax, TensorStore and the filesystems raise many kinds.
      if peers.is_peer_failure(e):
        raise
      error = e
    if not _on_any_process(error is not None):
      return manager
    try:
      manager.close()
    except Exception:  # The same error again.
      pass
    directory = manager.directory
    reason = _summary(error) if error is not None else "it failed on another process"
    first_reason = first_reason or reason
    if attempt == attempts:
      complete = saved_steps(directory.parent)
      kept = (f"checkpoint {complete[-1]} is complete, and running the same command again resumes "
              f"from it" if complete else "no checkpoint is complete yet")
      # A later attempt can fail on what an earlier one left (orbax removing a half-written step
      # while the failed save's writes still end), so the first cause is named too.
      causes = (f"the last with {reason}" if reason == first_reason
                else f"the first with {first_reason}, the last with {reason}")
      raise StorageError(f"saving checkpoint {step} to {directory} failed {attempts} times, "
                         f"{causes}; the run stops. {kept[0].upper()}{kept[1:]}.")
    delay = 2.0 ** (attempt - 1)
    log.warning("A checkpoint save to %s failed (%s); saving step %d again in %g s (attempt %d of "
                "%d).", directory, reason, step, delay, attempt + 1, attempts)
    time.sleep(delay)
    _remove_partial(directory, step)
    manager = make_manager(directory.parent, config.train)


def _remove_partial(directory, step: int) -> None:
  """Removes what a failed save of `step` left (process 0, the others waiting), so that the retry
  starts from nothing: orbax's own clean-up can trip over the files a failed save left behind."""
  if jax.process_index() == 0:
    for partial in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
      if paths.is_remote(partial):
        partial.rmtree(missing_ok=True)
      else:  # The failed save's last writes may still be landing; orbax removes what they leave.
        shutil.rmtree(partial, ignore_errors=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"remove partial checkpoint {step}")


def _on_any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.asarray(multihost_utils.process_allgather(np.array(flag))).any())


def restore(manager: ocp.CheckpointManager, setup: Setup, step: int | None = None, *,
            with_data: bool = True) -> tuple[TrainState, dict | None] | None:
  """The latest (or given) checkpoint restored onto this run's mesh, or None if there is none.

  The mesh may have a different number of devices or processes than the one that saved it.
  With `with_data=False` the data iterator's position is not read (translation needs none).

  Raises:
    CheckpointError: naming the checkpoint, if it does not restore or holds non-finite values.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  target = setup.abstract_state()
  _check_same_cooldown(manager, step, find_cooldown(target.opt_state) is not None)
  items = {"state": ocp.args.StandardRestore(target)}
  if with_data:
    items["data"] = ocp.args.JsonRestore()
  where = f"checkpoint {step} in {manager.directory}"
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax and TensorStore raise many kinds for damaged or partial files.
    raise CheckpointError(f"{where} does not restore: {_summary(e)}") from e
  if restored.state is None or (with_data and restored.data is None):
    raise CheckpointError(f"{where} is incomplete: its state or data position is missing")
  if not all_finite(restored.state):
    raise CheckpointError(f"{where} holds non-finite values (NaN or Inf); it cannot be used")
  return restored.state, (restored.data if with_data else None)


def restore_for_training(workdir: str, train: ml_collections.ConfigDict, setup: Setup
                         ) -> tuple[ocp.CheckpointManager, tuple[TrainState, dict] | None]:
  """The checkpoint manager of a run and its newest checkpoint that restores (None if it has none).

  Checkpoints newer than that one are damaged: each is named with the reason in the log and moved
  to `workdir/damaged_checkpoints/` (by process 0, the others waiting), so that the run can save
  those steps again.

  Raises:
    CheckpointError: if there are checkpoints but none of them restores.
  """
  manager = make_manager(workdir, train)
  steps = sorted(manager.all_steps(), reverse=True)
  damaged: list[tuple[int, CheckpointError]] = []
  for step in steps:
    try:
      restored = restore(manager, setup, step)
      break
    except CheckpointError as e:
      damaged.append((step, e))
  else:
    restored = None
  if damaged and restored is None:
    manager.close()
    reasons = "; ".join(str(e) for _, e in damaged)
    raise CheckpointError(
        f"none of the {len(damaged)} checkpoints in {manager.directory} restores ({reasons}). "
        "Nothing was changed. To train from scratch, move that directory away and run again.")
  if damaged:
    manager.close()
    for step, error in damaged:
      log.warning("Skipping %s; resuming from checkpoint %d instead.", error, int(restored[0].step))
    _move_damaged(workdir, [step for step, _ in damaged])
    manager = make_manager(workdir, train)
  return manager, restored


def _move_damaged(workdir: str, steps: list[int]) -> None:
  root = paths.resolve(workdir)
  if jax.process_index() == 0:
    target = root / "damaged_checkpoints"
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
      destination = target / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
      (root / "checkpoints" / str(step)).rename(destination)
      log.warning("Moved damaged checkpoint %d to %s.", step, destination)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("move damaged checkpoints")


def average(manager: ocp.CheckpointManager, setup: Setup, last: int | None = None, *,
            steps: list[int] | None = None) -> Any:
  """The mean of the parameters of the last `last` checkpoints (section 6.1: 5 for base, 20 for
  big), or of the checkpoints `steps`, accumulated in float32.

  Raises:
    CheckpointError: naming the checkpoint, if one of them does not restore.
  """
  if steps is None:
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
      raise ValueError(f"last={last!r}: average at least one checkpoint")
    steps = sorted(manager.all_steps())[-last:]
  if not steps:
    raise CheckpointError(f"no checkpoints in {manager.directory}")
  total = None
  for step in steps:
    params = restore(manager, setup, step, with_data=False)[0].params
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    total = params32 if total is None else jax.tree.map(jnp.add, total, params32)
  return jax.tree.map(lambda t, p: (t / len(steps)).astype(p.dtype), total, params)


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The run config saved with checkpoint `step`.

  Raises:
    CheckpointError: naming the checkpoint, if its config does not restore.
  """
  try:
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    if restored.config is None:
      raise ValueError("no config item")
    return ml_collections.ConfigDict(restored.config)
  except Exception as e:  # As in `restore`.
    raise CheckpointError(
        f"checkpoint {step} in {manager.directory}: its config does not restore: {_summary(e)}") from e


def save_best(workdir: str, params: Any, record: dict) -> None:
  """Keeps `params` as the run's best parameters so far, in `workdir/best` (one checkpoint,
  replacing the one before), with `record` (the step, the metric and its value). Every process
  calls it; it waits until the parameters are written."""
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, cleanup_tmp_directories=True)
  with ocp.CheckpointManager(paths.resolve(workdir) / "best", options=options) as manager:
    manager.save(int(record["step"]), args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), record=ocp.args.JsonSave(record)), force=True)
    manager.wait_until_finished()


def restore_best(workdir: str, setup: Setup) -> tuple[Any, dict] | None:
  """The run's best parameters on this run's mesh and their record, or None if there are none.

  Raises:
    CheckpointError: naming the directory, if they do not restore.
  """
  directory = paths.resolve(workdir) / "best"
  if not directory.is_dir():
    return None
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
    if step is None:
      return None
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(setup.abstract_state().params),
          record=ocp.args.JsonRestore()))
    except Exception as e:  # As in `restore`.
      raise CheckpointError(f"the best parameters in {directory} do not restore: {_summary(e)}") from e
  return restored.params, restored.record


def _check_same_cooldown(manager: ocp.CheckpointManager, step: int, cools: bool) -> None:
  """Raises ConfigError if checkpoint `step` was saved by a run with a cooldown and this run has
  none, or the other way round: the cooldown's plan is part of the optimiser state."""
  try:
    saved = cooldown_fraction(restore_config(manager, step).train)
  except CheckpointError:
    return  # `restore` reports the damage.
  if (saved > 0) != cools:
    raise ConfigError(
        f"checkpoint {step} in {manager.directory} was saved with train.cooldown_fraction={saved}, "
        f"and this run {'has a cooldown' if cools else 'has none'}: the cooldown's plan is part of "
        "the optimiser state. Resume with the cooldown_fraction it was saved with, or train in a "
        "new workdir.")


def _summary(error: Exception) -> str:
  """The first line of an error, with its type: orbax's and TensorStore's messages run long."""
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}"
