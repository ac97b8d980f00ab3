"""Checkpoints with orbax: the train state, the data position and the config, saved
asynchronously; restoring onto any mesh; averaging the last N (section 6.1).

Layout: `WORKDIR/checkpoints/STEP/{state,data,config}`; the tokenizer is `WORKDIR/tokenizer.model`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from transformer_jax.steps import Setup, TrainState


def make_manager(workdir: str, train: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Asynchronous orbax checkpoints under `workdir/checkpoints`, keeping the last K (and at least
  as many as averaging needs). orbax writes each step into a temporary directory and renames it
  when complete, so a crash mid-save leaves the previous checkpoints as they were."""
  keep = max(int(train.checkpoints_to_keep), int(train.checkpoints_to_average))
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(manager: ocp.CheckpointManager, state: TrainState, data_state: dict,
         config: ml_collections.ConfigDict) -> None:
  """Saves the train state, the data iterator's position and the config at `state.step`."""
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)


def restore(manager: ocp.CheckpointManager, setup: Setup,
            step: int | None = None) -> tuple[TrainState, dict] | None:
  """The latest (or given) checkpoint restored onto this run's mesh, or None if there is none.

  The mesh may have a different number of devices or processes than the one that saved it.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(setup.abstract_state()), data=ocp.args.JsonRestore()))
  return restored.state, restored.data


def average(manager: ocp.CheckpointManager, setup: Setup, last: int) -> Any:
  """The mean of the parameters of the last `last` checkpoints (section 6.1: 5 for base, 20 for
  big), accumulated in float32."""
  steps = sorted(manager.all_steps())[-last:]
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {manager.directory}")
  total = None
  for step in steps:
    params = restore(manager, setup, step)[0].params
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    total = params32 if total is None else jax.tree.map(jnp.add, total, params32)
  return jax.tree.map(lambda t, p: (t / len(steps)).astype(p.dtype), total, params)


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The run config saved with checkpoint `step`."""
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(restored.config)
