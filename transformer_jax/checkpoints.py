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

import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from transformer_jax import paths
from transformer_jax.errors import CheckpointError, ConfigError, NonFiniteError
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
