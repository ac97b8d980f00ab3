"""The train state and the compiled steps of a run: model, optimiser, mesh, and the jitted
`train_step` and `eval_step` over it.

`train_step(state, batch, dropout_key) -> (state, metrics)` is pure and jitted with the state
donated; `eval_step(params, batch) -> metrics` sums the loss over a batch. Both are `jax.jit`
objects on `Setup` (`Setup.jit_train_step`, `Setup.jit_eval_step`), so they can be lowered and
compiled ahead of time for any mesh; `Setup.train_step` and `Setup.eval_step` call them inside the
mesh and the logical axis rules.

Keys: `root_keys(seed)` splits the run's one root key by purpose, into the key that initialises the
parameters and the key that dropout folds the step into (`fold_in(dropout_key, step)`), so a
resumed run draws the keys a straight run would have drawn.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from transformer_jax import decode, sharding
from transformer_jax.config import TransformerConfig
from transformer_jax.errors import ConfigError
from transformer_jax.model import Transformer
from transformer_jax.optim import (NO_COOLDOWN, cooldown_factor, cooldown_fraction,
                                   learning_rate_schedule, make_optimizer)

Batch = dict[str, jax.Array]
PACKING_KEYS = ("src_segments", "src_positions", "tgt_segments", "tgt_positions")


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint needs to continue training, as one pytree.

  `cooldown` is the learning-rate cooldown's plan, int32 (first step, end step, aimed at a time
  budget) (`optim.NO_COOLDOWN` until the trainer places it), in runs with
  `train.cooldown_fraction` > 0; None (no leaf) in the others, so their checkpoints keep the shape
  they always had.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  cooldown: Any = None


def root_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init_key, dropout_key): the run's root key `key(seed)` split once, by purpose."""
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  return init_key, dropout_key


@dataclasses.dataclass
class Setup:
  """The model, optimiser, mesh and compiled steps of a run.

  Attributes:
    jit_train_step: `(state, batch, dropout_key) -> (state, metrics)`, jitted with the state
      donated and the shardings of `state_shardings` and `sharding.batch_sharding(mesh)`. Call it
      inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)` (as `train_step` does), or
      lower it with `ShapeDtypeStruct`s to compile it ahead of time.
    jit_eval_step: `(params, batch) -> summed metrics`, jitted likewise.

  Decoding functions are built once per setting and kept (`translate_fn`), so that every
  validation pass and every translated batch of a shape seen before reuses its compiled program.
  """

  model_config: TransformerConfig
  model: Transformer
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  rules: tuple
  state_shardings: Any
  jit_train_step: Any
  jit_eval_step: Any
  cools: bool = False  # Whether the state has a cooldown plan (train.cooldown_fraction > 0).
  _translate_fns: dict = dataclasses.field(default_factory=dict, repr=False)

  def train_step(self, state: TrainState, batch: Batch, dropout_key: jax.Array
                 ) -> tuple[TrainState, dict]:
    """One optimiser step (the state is donated: use the returned one)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jit_train_step(state, batch, dropout_key)

  def eval_step(self, params: Any, batch: Batch) -> dict:
    """Summed loss, nll, correct predictions and tokens of a batch (no dropout)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jit_eval_step(params, batch)

  def jit_translate_fn(self, beam_size: int, alpha: float, max_extra_len: int):
    """The jax.jit object behind `translate_fn` (one per setting), to call inside the mesh and
    the rules, or to lower ahead of time."""
    key = (beam_size, float(alpha), max_extra_len)
    if key not in self._translate_fns:
      self._translate_fns[key] = decode.make_translate_fn(self.model, beam_size, alpha, max_extra_len)
    return self._translate_fns[key]

  def translate_fn(self, beam_size: int, alpha: float, max_extra_len: int
                   ) -> Callable[[Any, jax.Array], jax.Array]:
    """`decode.translate` jitted for this setup: `(params, src [B, S]) -> tokens [B, S + extra]`,
    run inside the mesh and the logical axis rules (so the model's sharding constraints hold while
    decoding too). Built once per (beam_size, alpha, max_extra_len) and reused; XLA compiles it
    once per source shape."""
    jitted = self.jit_translate_fn(beam_size, alpha, max_extra_len)

    def translate(params: Any, src: jax.Array) -> jax.Array:
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return jitted(params, src)

    return translate

  def init_state(self, seed: int, params: Any = None) -> TrainState:
    """Fresh parameters (from `root_keys(seed)`'s init key), or the given ones (fine-tuning), and a
    fresh optimiser state, created directly in their shards.

    Raises:
      ConfigError: if `params` (host arrays) is not this model's parameter tree.
    """
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      if params is None:
        init = jax.jit(lambda key: nn.meta.unbox(_boxed_state(self.model, self.tx, key, self.cools)),
                       out_shardings=self.state_shardings)
        return init(root_keys(seed)[0])
      expected = self.abstract_state().params
      _check_same_tree(params, expected)
      params = jax.tree.map(lambda x, s: np.asarray(x, s.dtype), params, expected)
      start = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                           opt_state=self.tx.init(p), cooldown=_unplaced(self.cools)),
                      out_shardings=self.state_shardings)
      return start(params)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring a checkpoint onto this mesh."""
    shapes = jax.eval_shape(
        lambda: nn.meta.unbox(_boxed_state(self.model, self.tx, jax.random.key(0), self.cools)))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def with_cooldown(self, state: TrainState, first: int, end: int, by_time: bool) -> TrainState:
    """`state` with the cooldown planned from step `first` to step `end`, aimed at the end of a
    time budget or not. Every process must pass the same plan (the trainer agrees on it first)."""
    if not self.cools:
      raise ValueError("this run has no cooldown (train.cooldown_fraction is 0)")
    plan = np.array([first, end, int(by_time)], np.int32)
    sharding_ = self.state_shardings.cooldown
    return state.replace(cooldown=jax.make_array_from_callback(plan.shape, sharding_, lambda i: plan[i]))

  def fit_cooldown(self, state: TrainState) -> TrainState:
    """A restored state with the cooldown field this run expects: a checkpoint saved without a
    cooldown gets an unplaced one, and a run without a cooldown drops the plan it finds."""
    if not self.cools:
      return state.replace(cooldown=None)
    if state.cooldown is None:
      return self.with_cooldown(state, *NO_COOLDOWN)
    return state

  def put_batch(self, local: dict[str, np.ndarray]) -> Batch:
    """This process's rows of a batch -> global arrays sharded over the mesh."""
    return sharding.global_batch(local, self.mesh)


def _check_same_tree(params: Any, expected: Any) -> None:
  """Raises ConfigError naming the parameters whose paths or shapes differ."""
  ours = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  theirs = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  problems = [f"{k} missing" for k in theirs if k not in ours]
  problems += [f"{k} unexpected" for k in ours if k not in theirs]
  problems += [f"{k} has shape {ours[k]}, the model {theirs[k]}"
               for k in theirs if k in ours and ours[k] != theirs[k]]
  if problems:
    raise ConfigError(f"initial parameters do not fit the model: {'; '.join(problems[:5])}"
                      + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))


def _boxed_state(model: Transformer, tx: optax.GradientTransformation, key: jax.Array,
                 cools: bool) -> TrainState:
  tokens = jnp.ones((1, 8), jnp.int32)
  params = model.init(key, tokens, tokens)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    cooldown=_unplaced(cools))


def _unplaced(cools: bool) -> jax.Array | None:
  """A new state's cooldown field: a plan the trainer has yet to place, or none."""
  return jnp.array(NO_COOLDOWN, jnp.int32) if cools else None


def _model_inputs(batch: Batch) -> dict[str, jax.Array]:
  return {k: batch[k] for k in PACKING_KEYS if k in batch}


def make_setup(config: ml_collections.ConfigDict, devices: list | None = None) -> Setup:
  """Builds the model, the optimiser, the mesh and the jitted steps from a run config.

  Args:
    config: the run config (`model`, `train` and `mesh` are read).
    devices: the devices of the mesh; default all of them (`jax.devices()`).
  """
  model_config = TransformerConfig.from_config(config.model)
  model = Transformer(model_config)
  tx = make_optimizer(config.train, model_config.d_model)
  schedule = learning_rate_schedule(config.train, model_config.d_model)
  mesh = sharding.make_mesh(config.mesh, devices)
  platform = mesh.devices.flat[0].platform
  if model_config.attention_impl == "cudnn" and platform != "gpu":
    raise ConfigError(f"model.attention_impl='cudnn' needs an NVIDIA GPU (cuDNN's fused attention); "
                      f"this run's devices are {platform.upper()}s: use 'dot_product' (XLA's choice) "
                      "or 'einsum'")
  rules = sharding.axis_rules(config.mesh)
  cools = cooldown_fraction(config.train) > 0
  boxed = jax.eval_shape(lambda: _boxed_state(model, tx, jax.random.key(0), cools))
  state_shardings = sharding.logical_shardings(boxed, mesh, rules)
  # The loss without the [B, T, V] logits (Transformer.metrics), over slices of the target length.
  loss_options = {"label_smoothing": float(config.train.label_smoothing),
                  "chunks": int(config.train.get("loss_chunks", 1))}
  accum = int(config.train.grad_accum_steps)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def train_step(state: TrainState, batch: Batch, dropout_key: jax.Array) -> tuple[TrainState, dict]:
    step_key = jax.random.fold_in(dropout_key, state.step)

    def loss_fn(params):
      metrics = model.apply({"params": params}, batch["src"], batch["tgt"], train=True,
                            rngs={"dropout": step_key}, method=Transformer.metrics,
                            **loss_options, **_model_inputs(batch))
      return metrics["loss"] / jnp.maximum(metrics["tokens"], 1.0), metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics["learning_rate"] = schedule(state.step // accum)
    if state.cooldown is not None:  # Adam's update is proportional to the learning rate.
      factor = cooldown_factor(state.step, state.cooldown)
      updates = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
      metrics["learning_rate"] *= factor
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(params: Any, batch: Batch) -> dict:
    return model.apply({"params": params}, batch["src"], batch["tgt"], method=Transformer.metrics,
                       **loss_options, **_model_inputs(batch))

  batch_sharding = sharding.batch_sharding(mesh)
  jit_train = jax.jit(train_step, donate_argnums=0,
                      in_shardings=(state_shardings, batch_sharding, replicated),
                      out_shardings=(state_shardings, replicated))
  jit_eval = jax.jit(eval_step, in_shardings=(state_shardings.params, batch_sharding),
                     out_shardings=replicated)
  return Setup(model_config, model, tx, mesh, rules, state_shardings, jit_train, jit_eval, cools)


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
