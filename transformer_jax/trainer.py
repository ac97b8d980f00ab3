"""Training: the train state, jitted and sharded train/eval steps, orbax checkpoints, the loop.

`train_step(state, batch, key) -> (state, metrics)` is pure and jitted with the state donated;
logging, checkpointing, evaluation and progress live in the Python loop of `train_and_evaluate`.
Dropout keys are `fold_in(key(config.seed), step)`, so a resumed run draws the keys a straight run
would have drawn.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from transformer_jax import sharding
from transformer_jax.config import TransformerConfig
from transformer_jax.data import pipeline
from transformer_jax.flops import peak_flops_per_device, train_step_flops
from transformer_jax.losses import compute_metrics
from transformer_jax.model import Transformer
from transformer_jax.optim import learning_rate_schedule, make_optimizer

Batch = dict[str, jax.Array]
PACKING_KEYS = ("src_segments", "src_positions", "tgt_segments", "tgt_positions")


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint needs to continue training, as one pytree."""

  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass
class Setup:
  """The model, optimiser, mesh and compiled steps of a run."""

  model_config: TransformerConfig
  model: Transformer
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  rules: tuple
  state_shardings: Any
  train_step: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]
  eval_step: Callable[[Any, Batch], dict]

  def init_state(self, seed: int) -> TrainState:
    """Fresh parameters and optimiser state, created directly in their shards."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      init = jax.jit(lambda key: nn.meta.unbox(_boxed_state(self.model, self.tx, key)),
                     out_shardings=self.state_shardings)
      return init(jax.random.key(seed))

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring a checkpoint onto this mesh."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(_boxed_state(self.model, self.tx, jax.random.key(0))))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def put_batch(self, local: dict[str, np.ndarray]) -> Batch:
    return sharding.global_batch(local, self.mesh)


def _boxed_state(model: Transformer, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  tokens = jnp.ones((1, 8), jnp.int32)
  params = model.init(key, tokens, tokens)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _model_inputs(batch: Batch) -> dict[str, jax.Array]:
  return {k: batch[k] for k in PACKING_KEYS if k in batch}


def make_setup(config: ml_collections.ConfigDict, devices: list | None = None) -> Setup:
  """Builds the model, the optimiser, the mesh and the jitted steps from a run config."""
  model_config = TransformerConfig.from_config(config.model)
  model = Transformer(model_config)
  tx = make_optimizer(config.train, model_config.d_model)
  schedule = learning_rate_schedule(config.train, model_config.d_model)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.axis_rules(config.mesh)
  boxed = jax.eval_shape(lambda: _boxed_state(model, tx, jax.random.key(0)))
  state_shardings = sharding.logical_shardings(boxed, mesh, rules)
  label_smoothing = float(config.train.label_smoothing)
  accum = int(config.train.grad_accum_steps)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def train_step(state: TrainState, batch: Batch, key: jax.Array) -> tuple[TrainState, dict]:
    dropout_key = jax.random.fold_in(key, state.step)

    def loss_fn(params):
      logits = model.apply({"params": params}, batch["src"], batch["tgt"], train=True,
                           rngs={"dropout": dropout_key}, **_model_inputs(batch))
      metrics = compute_metrics(logits, batch["tgt"], label_smoothing)
      return metrics["loss"] / jnp.maximum(metrics["tokens"], 1.0), metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = schedule(state.step // accum)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(params: Any, batch: Batch) -> dict:
    logits = model.apply({"params": params}, batch["src"], batch["tgt"], **_model_inputs(batch))
    return compute_metrics(logits, batch["tgt"], label_smoothing)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jit_train = jax.jit(train_step, donate_argnums=0,
                        in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated),
                        out_shardings=(state_shardings, replicated))
    jit_eval = jax.jit(eval_step, in_shardings=(state_shardings.params, sharding.batch_sharding(mesh)),
                       out_shardings=replicated)

  def run_in_mesh(fn):
    def wrapped(*args):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return fn(*args)
    return wrapped

  return Setup(model_config, model, tx, mesh, rules, state_shardings,
               run_in_mesh(jit_train), run_in_mesh(jit_eval))


def evaluate_loss(setup: Setup, params: Any, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
  """Token-weighted loss, accuracy and perplexity over every batch (each example counted once)."""
  totals: dict[str, float] = {}
  for local in batches:
    metrics = jax.device_get(setup.eval_step(params, setup.put_batch(local)))
    for k, v in metrics.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  tokens = max(totals.get("tokens", 0.0), 1.0)
  return {
      "loss": totals.get("loss", 0.0) / tokens,
      "accuracy": totals.get("correct", 0.0) / tokens,
      "perplexity": math.exp(min(totals.get("nll", 0.0) / tokens, 50.0)),
      "tokens": totals.get("tokens", 0.0),
  }


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, train: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Asynchronous orbax checkpoints under `workdir/checkpoints`, keeping the last K (and at least
  as many as averaging needs). orbax writes each step into a temporary directory and renames it
  when complete, so a crash mid-save leaves the previous checkpoints as they were."""
  keep = max(int(train.checkpoints_to_keep), int(train.checkpoints_to_average))
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, data_state: dict,
                    config: ml_collections.ConfigDict) -> None:
  """Saves the train state, the data iterator's position and the config at `state.step`."""
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, setup: Setup, step: int | None = None
                       ) -> tuple[TrainState, dict] | None:
  """The latest (or given) checkpoint restored onto this run's mesh, or None if there is none.

  The mesh may have a different number of devices or processes than the one that saved it.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(setup.abstract_state()), data=ocp.args.JsonRestore()))
  return restored.state, restored.data


def average_checkpoints(manager: ocp.CheckpointManager, setup: Setup, last: int) -> Any:
  """The mean of the parameters of the last `last` checkpoints (section 6.1: 5 for base, 20 for
  big), accumulated in float32."""
  steps = sorted(manager.all_steps())[-last:]
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {manager.directory}")
  total = None
  for step in steps:
    params = restore_checkpoint(manager, setup, step)[0].params
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    total = params32 if total is None else jax.tree.map(jnp.add, total, params32)
  return jax.tree.map(lambda t, p: (t / len(steps)).astype(p.dtype), total, params)


# ----------------------------------------------------------------------------- the loop


class StopRequests:
  """SIGTERM (preemption) and the time budget, agreed on by every process at the same step."""

  def __init__(self, time_budget_s: float):
    self.deadline = time.monotonic() + time_budget_s if time_budget_s > 0 else math.inf
    self.sigterm = False
    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.sigterm = True

  def check(self) -> str | None:
    """'sigterm', 'time' or None; every process gets the same answer (a collective)."""
    local = np.array([self.sigterm, time.monotonic() >= self.deadline])
    if jax.process_count() > 1:
      local = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2).any(axis=0)
    return "sigterm" if local[0] else "time" if local[1] else None

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLossError(FloatingPointError):
  pass


def check_finite(history: list[dict], last_saved: int | None) -> None:
  for metrics in history:
    if not np.isfinite(metrics["loss"]):
      raise NonFiniteLossError(
          f"the training loss became {metrics['loss']} at step {metrics['step']}; stopping. The last "
          f"good checkpoint (step {last_saved}) is kept. Lower the learning rate, enable "
          "--config.train.grad_clip_norm, or check the data.")


class MetricWriter:
  """Metrics to `workdir/metrics.jsonl` (one JSON object a line) and TensorBoard event files;
  only process 0 writes."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      from tensorboardX import SummaryWriter  # Pure Python: no TensorFlow needed.
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self.active:
      return
    self._jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      if isinstance(value, (int, float)) and np.isfinite(value):
        self._tb.add_scalar(f"{split}/{name}", value, step)
    self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()


def _progress(total: int, initial: int):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
              disable=jax.process_index() != 0, mininterval=2.0)


def train(config: ml_collections.ConfigDict, workdir: str, setup: Setup, batches,
          evaluate: Callable[[Any, int], dict] | None = None) -> TrainState:
  """Runs (or resumes) training until `config.train.num_steps`, the time budget, or SIGTERM.

  Args:
    config: the run config.
    workdir: the run directory; checkpoints go to `workdir/checkpoints`.
    setup: from `make_setup(config)`.
    batches: a `data.pipeline.EpochBatches` (random access to this process's rows of each batch).
    evaluate: called as `evaluate(params, step)` every `train.eval_every` steps and at the end;
      returns metrics to log under "validation".

  Returns:
    The final train state (also saved as the last checkpoint).
  """
  train_cfg = config.train
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  manager = checkpoint_manager(workdir, train_cfg)
  iterator = iter(pipeline.make_dataset(batches, num_workers=config.data.num_workers))
  restored = restore_checkpoint(manager, setup)
  if restored is None:
    state = setup.init_state(config.seed)
  else:
    state, data_state = restored
    iterator.set_state(data_state)
    logging.info("Resumed from step %d in %s.", int(state.step), manager.directory)
  key = jax.random.key(config.seed)
  writer = MetricWriter(workdir)
  stop = StopRequests(60.0 * train_cfg.time_budget_minutes)
  peak = peak_flops_per_device(setup.model_config.dtype, config.train.peak_flops)

  step = int(jax.device_get(state.step))
  last_saved = manager.latest_step()
  progress = _progress(train_cfg.num_steps, step)
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
    check_finite(history, last_saved)
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
    progress.set_postfix_str(
        f"loss {summary['loss']:.3f} lr {summary['learning_rate']:.2e} "
        f"{summary['target_tokens_per_s']:,.0f} tok/s" + (f" mfu {summary['mfu']:.1%}" if peak > 0 else ""),
        refresh=False)
    pending, flops, window_start = [], 0.0, time.perf_counter()

  def save() -> None:
    nonlocal last_saved
    flush_metrics()  # Never checkpoint a state whose loss has gone non-finite.
    if last_saved != step:
      save_checkpoint(manager, state, iterator.get_state(), config)
      last_saved = step

  try:
    while step < train_cfg.num_steps:
      local = next(iterator)
      n, src_len = local["src"].shape
      flops += train_step_flops(setup.model_config, n * jax.process_count(), src_len,
                                   local["tgt"].shape[1])
      state, metrics = setup.train_step(state, setup.put_batch(local), key)
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
      if step % sync_every == 0 and (reason := stop.check()):
        break
    save()
    if reason == "sigterm":
      logging.warning("Stopped by SIGTERM at step %d; the checkpoint is saved.", step)
    elif reason == "time":
      logging.info("Time budget of %.1f min reached at step %d.", train_cfg.time_budget_minutes, step)
    if evaluate is not None and step % train_cfg.eval_every != 0 and reason != "sigterm":
      writer.write(step, "validation", evaluate(state.params, step))
  finally:
    progress.close()
    manager.wait_until_finished()
    manager.close()
    stop.close()
    writer.close()
  return state

