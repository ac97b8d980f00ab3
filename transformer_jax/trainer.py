"""Training: the train state, jitted and sharded train/eval steps, orbax checkpoints, the loop.

`train_step(state, batch, key) -> (state, metrics)` is pure and jitted with the state donated;
logging, checkpointing, evaluation and progress live in the Python loop of `train_and_evaluate`.
Dropout keys are `fold_in(key(config.seed), step)`, so a resumed run draws the keys a straight run
would have drawn.
"""

from __future__ import annotations

import ctypes
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
from jax.experimental import multihost_utils

from transformer_jax import checkpoints, evaluate, sharding
from transformer_jax.config import TransformerConfig
from transformer_jax.data import pipeline, sources
from transformer_jax.flops import peak_flops_per_device, train_step_flops
from transformer_jax.losses import compute_metrics
from transformer_jax.model import Transformer
from transformer_jax.optim import learning_rate_schedule, make_optimizer
from transformer_jax.tokenizer import Tokenizer, load_or_train_tokenizer

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]
PACKING_KEYS = ("src_segments", "src_positions", "tgt_segments", "tgt_positions")


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h).


def keep_cpu_step_memory() -> bool:
  """Lets XLA:CPU reuse a train step's temporary memory instead of faulting it in afresh each step.

  XLA:CPU allocates a step's temporaries as one block (over a gigabyte for base at 8 x 128 tokens).
  A worker thread gets a block that large from glibc as a fresh mmap, unmapped when the step ends,
  so each step page-faults the whole block in again: 336,000 minor faults a base step against
  1,100 with this function, and 14 to 18% of the step time on two cores (BENCHMARKS.md). Running
  CPU computations on the calling thread (no asynchronous dispatch; the training loop waits for
  each step anyway) with glibc's mmap and heap trimming switched off keeps the block in the heap
  from one step to the next. (Trimming must be off, not just rare: with a 2 GB threshold, a base
  step of 32 x 128 tokens, whose block is larger, still took 1.5 million faults and 55% longer.)
  The cost: the process keeps its peak heap rather than returning it to the system. On a GPU or
  TPU host the device computations are unaffected; the glibc settings still apply to the host's
  memory (data loading, checkpoints).

  Call it before JAX initialises its backends (train.py does); once the CPU client exists, its
  dispatch mode is fixed.

  Returns:
    Whether glibc accepted the settings (False where there is no glibc, e.g. macOS).
  """
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  # A trim threshold of -1 (SIZE_MAX once glibc casts it) never gives the heap's top back.
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


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


class StopRequests:
  """SIGTERM (preemption) and the time budget, agreed on by every process at the same step."""

  def __init__(self, time_budget_s: float):
    self.deadline = time.monotonic() + time_budget_s if time_budget_s > 0 else math.inf
    self.sigterm = False
    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM received: saving a checkpoint and stopping.")
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
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=2.0,
              disable=jax.process_index() != 0,
              bar_format="{l_bar}{bar}| step {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]")


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
  manager = checkpoints.make_manager(workdir, train_cfg)
  iterator = iter(pipeline.make_dataset(batches, num_workers=config.data.num_workers))
  restored = checkpoints.restore(manager, setup)
  if restored is None:
    state = setup.init_state(config.seed)
  else:
    state, data_state = restored
    iterator.set_state(data_state)
    log.info("Resumed from step %d in %s.", int(state.step), manager.directory)
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
    # Time left: by steps at the current rate, or by the time budget, whichever ends first.
    left = (train_cfg.num_steps - step) / summary["steps_per_s"]
    left = min(left, max(0.0, stop.deadline - time.monotonic()))
    progress.total = min(train_cfg.num_steps, step + int(left * summary["steps_per_s"]))
    progress.set_postfix_str(
        f"loss {summary['loss']:.3f} lr {summary['learning_rate']:.2e} "
        f"{summary['target_tokens_per_s']:,.0f} tok/s" + (f" mfu {summary['mfu']:.1%}" if peak > 0 else "")
        + f" left {int(left // 60)}:{int(left % 60):02d}", refresh=False)
    pending, flops, window_start = [], 0.0, time.perf_counter()

  def save() -> None:
    nonlocal last_saved
    flush_metrics()  # Never checkpoint a state whose loss has gone non-finite.
    if last_saved != step:
      checkpoints.save(manager, state, iterator.get_state(), config)
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
      log.warning("Stopped by SIGTERM at step %d; the checkpoint is saved.", step)
    elif reason == "time":
      log.info("Time budget of %.1f min reached at step %d.", train_cfg.time_budget_minutes, step)
    if evaluate is not None and step % train_cfg.eval_every != 0 and reason != "sigterm":
      writer.write(step, "validation", evaluate(state.params, step))
  finally:
    progress.close()
    manager.wait_until_finished()
    manager.close()
    stop.close()
    writer.close()
  return state



# ----------------------------------------------------------------------------- the whole run


@dataclasses.dataclass
class Split:
  """One split of the corpus, tokenized, and the examples that fit `data.max_len`."""

  name: str
  raw: Any  # data.sources.ParallelData
  corpus: pipeline.TokenizedCorpus
  indices: np.ndarray

  def references(self, indices: np.ndarray | None = None) -> list[str]:
    indices = self.indices if indices is None else indices
    return [self.raw.examples[int(i)][self.raw.target_lang].decode("utf-8") for i in indices]

  def sources(self, indices: np.ndarray) -> list[str]:
    return [self.raw.examples[int(i)][self.raw.source_lang].decode("utf-8") for i in indices]


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str, train_data) -> Tokenizer:
  """The run's tokenizer: `workdir/tokenizer.model`, trained on the training split (both sides,
  a seeded sample) by process 0 the first time, and loaded by every process."""
  path = os.path.join(workdir, "tokenizer.model")
  if jax.process_index() == 0 and not os.path.exists(path):
    examples = train_data.examples
    order = np.random.default_rng(config.seed).permutation(len(examples))
    order = order[:max(1, config.data.tokenizer_max_sentences // 2)]
    sentences = (examples[int(i)][lang] for i in order for lang in (train_data.source_lang, train_data.target_lang))
    load_or_train_tokenizer(path, sentences, config.model.vocab_size, model_type=config.data.tokenizer,
                            max_sentences=config.data.tokenizer_max_sentences, seed=config.seed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tokenizer")
  return load_or_train_tokenizer(path, (), config.model.vocab_size)


def load_split(config: ml_collections.ConfigDict, workdir: str, name: str, tokenizer) -> Split:
  raw = sources.load_split(config.data, name)
  cache = os.path.join(workdir, "cache", pipeline.corpus_cache_name(
      f"{raw.name}-{raw.source_lang}-{raw.target_lang}", name, len(raw.examples), tokenizer))
  corpus = pipeline.tokenize_corpus(raw.examples, raw.source_lang, raw.target_lang, tokenizer,
                                    cache_path=cache)
  indices, dropped = pipeline.keep_indices(corpus, config.data.max_len)
  log.info("%s: %d examples, %d longer than %d tokens dropped.", name, len(indices), dropped,
               config.data.max_len)
  return Split(name, raw, corpus, indices)


def translation_metrics(setup: Setup, params: Any, config: ml_collections.ConfigDict, split: Split,
                        tokenizer, indices: np.ndarray | None = None, beam_size: int | None = None
                        ) -> tuple[dict[str, Any], list[str]]:
  """sacreBLEU and chrF of the model's translations of `split` (or of its `indices`)."""
  indices = split.indices if indices is None else indices
  hypotheses = evaluate.translate_corpus(
      setup.model, params, setup.mesh, split.corpus, indices, tokenizer,
      tokens_per_batch=config.data.tokens_per_batch, max_len=config.data.max_len,
      beam_size=config.decode.beam_size if beam_size is None else beam_size,
      alpha=config.decode.length_penalty, max_extra_len=config.decode.max_extra_len)
  return evaluate.score(hypotheses, split.references(indices)), hypotheses


def eval_batches(config: ml_collections.ConfigDict, setup: Setup, split: Split) -> pipeline.EpochBatches:
  """Every example of the split exactly once, bucketed, padded (never dropped)."""
  return pipeline.EpochBatches(
      split.corpus, split.indices, tokens_per_batch=config.data.tokens_per_batch,
      max_len=config.data.max_len, packing=False, seed=0, shuffle=False, num_epochs=1,
      multiple_of=sharding.batch_multiple(setup.mesh), process_index=jax.process_index(),
      process_count=jax.process_count())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The main job: prepare the data and the tokenizer, train (or resume), then evaluate on the
  test split (loss, perplexity, sacreBLEU, chrF) and print a few translations.

  Returns:
    The test metrics.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  setup = make_setup(config)
  log.info("Mesh %s over %d devices (%d processes).", dict(setup.mesh.shape), jax.device_count(),
               jax.process_count())
  train_raw = sources.load_split(config.data, "train")
  tokenizer = load_tokenizer(config, workdir, train_raw)
  train_split = load_split(config, workdir, "train", tokenizer)
  validation = load_split(config, workdir, "validation", tokenizer)
  batches = pipeline.EpochBatches(
      train_split.corpus, train_split.indices, tokens_per_batch=config.data.tokens_per_batch,
      max_len=config.data.max_len, packing=config.data.packing, seed=config.seed, shuffle=True,
      num_epochs=None, multiple_of=sharding.batch_multiple(setup.mesh),
      process_index=jax.process_index(), process_count=jax.process_count())
  _log_padding(batches)
  bleu_sample = validation.indices[:config.train.eval_bleu_sentences]

  def evaluate_validation(params, step):
    metrics = evaluate_loss(setup, params, eval_batches(config, setup, validation))
    if len(bleu_sample):
      scores, _ = translation_metrics(setup, params, config, validation, tokenizer, bleu_sample, beam_size=1)
      metrics.update(bleu_greedy=scores["bleu"], chrf_greedy=scores["chrf"])
    log.info("step %d validation: %s", step, _fmt(metrics))
    return metrics

  state = train(config, workdir, setup, batches, evaluate_validation)

  test = load_split(config, workdir, "test", tokenizer)
  metrics = evaluate_loss(setup, state.params, eval_batches(config, setup, test))
  start = time.perf_counter()
  if config.train.test_sentences:
    test.indices = test.indices[:config.train.test_sentences]
  scores, hypotheses = translation_metrics(setup, state.params, config, test, tokenizer)
  metrics.update(scores, decode_seconds=time.perf_counter() - start, step=int(jax.device_get(state.step)))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "test_hypotheses.txt"), "w") as f:
      f.writelines(h + "\n" for h in hypotheses)
    with open(os.path.join(workdir, "test_metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
    print(f"\nTest ({test.raw.name}, {len(test.indices)} sentences, beam {config.decode.beam_size}): "
          f"sacreBLEU {scores['bleu']:.1f}, chrF {scores['chrf']:.1f}, loss {metrics['loss']:.3f}, "
          f"perplexity {metrics['perplexity']:.2f}\n  {scores['bleu_signature']}")
    for source, hypothesis, reference in list(zip(test.sources(test.indices), hypotheses,
                                                  test.references()))[:config.train.samples_to_print]:
      print(f"\n  source:     {source}\n  translation: {hypothesis}\n  reference:  {reference}")
  return metrics


def _log_padding(batches: pipeline.EpochBatches) -> None:
  sample = [batches[k] for k in range(min(20, len(batches.plan(0))))]
  log.info("Training batches: %d per epoch, %.1f%% padding (first %d batches).",
               len(batches.plan(0)), 100 * np.mean([pipeline.padding_fraction(b) for b in sample]), len(sample))


def _fmt(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
