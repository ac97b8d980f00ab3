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
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from transformer_jax import accelerators, kernels, losses, optim, sharding
from transformer_jax.config import TransformerConfig
from transformer_jax.errors import ConfigError
from transformer_jax.model import Transformer
from transformer_jax.optim import make_optimizer

Batch = dict[str, jax.Array]
PACKING_KEYS = ("src_segments", "src_positions", "tgt_segments", "tgt_positions")


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint needs to continue training, as one pytree."""

  step: jax.Array
  params: Any
  opt_state: Any


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

  Decoding is `translation`'s (`translation.translator(model, mesh, rules)`).
  """

  model_config: TransformerConfig
  model: Transformer
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  rules: tuple
  state_shardings: Any
  jit_train_step: Any
  jit_eval_step: Any

  def train_step(self, state: TrainState, batch: Batch, dropout_key: jax.Array
                 ) -> tuple[TrainState, dict]:
    """One optimiser step (the state is donated: use the returned one)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jit_train_step(state, batch, dropout_key)

  def eval_step(self, params: Any, batch: Batch) -> dict:
    """Summed loss, nll, correct predictions and tokens of a batch (no dropout)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jit_eval_step(params, batch)

  def init_state(self, seed: int, params: Any = None) -> TrainState:
    """Fresh parameters (from `root_keys(seed)`'s init key), or the given ones (fine-tuning), and a
    fresh optimiser state, created directly in their shards.

    Raises:
      ConfigError: if `params` (host arrays) is not this model's parameter tree.
    """
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      if params is None:
        init = jax.jit(lambda key: nn.meta.unbox(_boxed_state(self.model, self.tx, key)),
                       out_shardings=self.state_shardings)
        return init(root_keys(seed)[0])
      expected = self.abstract_state().params
      _check_same_tree(params, expected)
      params = jax.tree.map(lambda x, s: np.asarray(x, s.dtype), params, expected)
      start = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                           opt_state=self.tx.init(p)),
                      out_shardings=self.state_shardings)
      return start(params)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring a checkpoint onto this mesh."""
    shapes = jax.eval_shape(
        lambda: nn.meta.unbox(_boxed_state(self.model, self.tx, jax.random.key(0))))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

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


def _boxed_state(model: Transformer, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  tokens = jnp.ones((1, 8), jnp.int32)
  params = model.init(key, tokens, tokens)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def batch_metrics(model: Transformer, params: Any, batch: Batch, label_smoothing: float,
                  chunks: int, *, train: bool, rngs: dict | None = None) -> dict[str, jax.Array]:
  """The summed loss, nll, correct predictions and tokens of a batch (`losses.compute_metrics`),
  the train and eval steps' objective.

  The loss's one switch to speed kernels: with `model.cpu_kernels` or `train.loss_chunks` > 1 the
  pre-softmax projection and the loss run in `kernels.vocabulary_metrics` (over `chunks` slices of
  the target length, never holding all the [B, T, V] logits; only the loss has a gradient), with
  the same sums; otherwise the logits are made whole and scored as the paper's loss reads.
  """
  inputs = {k: batch[k] for k in PACKING_KEYS if k in batch}
  if model.config.cpu_kernels or chunks > 1:
    y, table, bias = model.apply({"params": params}, batch["src"], batch["tgt"], train=train,
                                 rngs=rngs, method=Transformer.features, **inputs)
    return kernels.vocabulary_metrics(y, table, batch["tgt"], label_smoothing, bias=bias,
                                      chunks=chunks, cpu_backward=model.config.cpu_kernels)
  logits = model.apply({"params": params}, batch["src"], batch["tgt"], train=train, rngs=rngs,
                       **inputs)
  return losses.compute_metrics(logits, batch["tgt"], label_smoothing)


def make_setup(config: ml_collections.ConfigDict, devices: list | None = None) -> Setup:
  """Builds the model, the optimiser, the mesh and the jitted steps from a run config.

  Args:
    config: the run config (`model`, `train` and `mesh` are read).
    devices: the devices of the mesh; default all of them (`jax.devices()`).
  """
  model_config = TransformerConfig.from_config(config.model)
  model = Transformer(model_config)
  tx = make_optimizer(config.train, model_config.d_model)
  learning_rate = optim.learning_rate(config.train, model_config.d_model)
  mesh = sharding.make_mesh(config.mesh, devices)
  if model_config.attention_impl == "cudnn":
    accelerators.check_cudnn_attention(mesh.devices.flat)
  rules = sharding.axis_rules(config.mesh)
  boxed = jax.eval_shape(lambda: _boxed_state(model, tx, jax.random.key(0)))
  state_shardings = sharding.logical_shardings(boxed, mesh, rules)
  label_smoothing = float(config.train.label_smoothing)
  chunks = int(config.train.get("loss_chunks", 1))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def train_step(state: TrainState, batch: Batch, dropout_key: jax.Array) -> tuple[TrainState, dict]:
    step_key = jax.random.fold_in(dropout_key, state.step)

    def loss_fn(params):
      metrics = batch_metrics(model, params, batch, label_smoothing, chunks, train=True,
                              rngs={"dropout": step_key})
      return metrics["loss"] / jnp.maximum(metrics["tokens"], 1.0), metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics["learning_rate"] = learning_rate(state.step, state.opt_state)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(params: Any, batch: Batch) -> dict:
    return batch_metrics(model, params, batch, label_smoothing, chunks, train=False)

  batch_sharding = sharding.batch_sharding(mesh)
  jit_train = jax.jit(train_step, donate_argnums=0,
                      in_shardings=(state_shardings, batch_sharding, replicated),
                      out_shardings=(state_shardings, replicated))
  jit_eval = jax.jit(eval_step, in_shardings=(state_shardings.params, batch_sharding),
                     out_shardings=replicated)
  return Setup(model_config, model, tx, mesh, rules, state_shardings, jit_train, jit_eval)
