"""The main job, as `train.py` runs it: data, tokenizer, training with validation, then the test.

`train_and_evaluate(config, workdir)` prepares the corpus's splits and the run's SentencePiece
model, tokenizes the splits (cached under `workdir/cache`), trains (or resumes) with periodic
validation loss and greedy BLEU, and finally scores the test split: loss, perplexity, sacreBLEU and
chrF of beam-search translations, a few of them printed.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from transformer_jax import checkpoints, cpu, hosts, marian, paths, sharding, trainer
from transformer_jax.config import validate_run_config
from transformer_jax.data import pipeline, sources, token_cache
from transformer_jax.errors import ConfigError, DataError
from transformer_jax.metrics import read_metrics
from transformer_jax.evaluate import (Split, choose_test_params, eval_batches, evaluate_loss,
                                      minutes_to_bleu, translation_metrics)
from transformer_jax.steps import make_setup
from transformer_jax.tokenizer import (MARIAN_TOKENIZER_DIR, SPECIAL_IDS_FILE, MarianVocabTokenizer,
                                      load_or_train_tokenizer)

log = logging.getLogger(__name__)


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str, train_data):
  """The run's tokenizer: `workdir/tokenizer.model`, trained on the training split (both sides,
  a seeded sample) by process 0 the first time, and loaded by every process; or, fine-tuning
  (`config.init_from`), the Marian model's, copied into `workdir/marian_tokenizer`."""
  if config.init_from:
    return _marian_tokenizer(config, workdir)
  path = paths.resolve(workdir) / "tokenizer.model"

  def train() -> None:
    if path.exists():
      return
    examples = train_data.examples
    order = np.random.default_rng(config.seed).permutation(len(examples))
    order = order[:max(1, config.data.tokenizer_max_sentences // 2)]
    chunks = (sources.read_many(examples, order[k:k + 4096]) for k in range(0, len(order), 4096))
    sentences = (ex[lang] for chunk in chunks for ex in chunk
                 for lang in (train_data.source_lang, train_data.target_lang))
    load_or_train_tokenizer(path, sentences, config.model.vocab_size, model_type=config.data.tokenizer,
                            max_sentences=config.data.tokenizer_max_sentences, seed=config.seed)

  hosts.once("the tokenizer", train, after=lambda: None,
             timeout_minutes=config.data.prepare_timeout_minutes)
  return load_or_train_tokenizer(path, (), config.model.vocab_size)


def _marian_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> MarianVocabTokenizer:
  path = paths.resolve(workdir) / MARIAN_TOKENIZER_DIR

  def copy() -> None:
    if not (path / SPECIAL_IDS_FILE).exists():  # Written last by `save`.
      MarianVocabTokenizer.load(config.init_from).save(path)

  hosts.once("the tokenizer", copy, after=lambda: None, timeout_minutes=config.data.prepare_timeout_minutes)
  tokenizer = MarianVocabTokenizer.load(path)
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ConfigError(f"the tokenizer in {path} has {tokenizer.vocab_size} pieces but "
                      f"model.vocab_size={config.model.vocab_size}; use a new workdir")
  return tokenizer


def load_split(config: ml_collections.ConfigDict, workdir: str, name: str, tokenizer) -> Split:
  """A split, prepared (tfds) and tokenized (cached in `workdir/cache`) by process 0 while the
  other processes wait, then read by all."""

  def prepare() -> tuple[Any, token_cache.TokenizedCorpus]:
    raw = sources.load_split(config.data, name)
    cache = paths.resolve(workdir) / "cache" / token_cache.corpus_cache_name(
        f"{raw.name}-{raw.source_lang}-{raw.target_lang}", name, len(raw.examples), tokenizer)
    if not token_cache.is_corpus_cache(cache):
      if jax.process_index() > 0:
        log.warning("%s is not where process 0 wrote it (is the workdir shared?): tokenizing here too.", cache)
      log.info("%s: tokenizing %d examples into %s.", name, len(raw.examples), cache)
    corpus = token_cache.tokenize_corpus(
        raw.examples, raw.source_lang, raw.target_lang, tokenizer, cache_path=cache,
        processes=config.data.tokenize_processes, local_dir=config.data.local_cache_dir)
    return raw, corpus

  raw, corpus = hosts.once(f"the {name} split", prepare, timeout_minutes=config.data.prepare_timeout_minutes)
  indices, dropped = pipeline.keep_indices(corpus, config.data.max_len)
  log.info("%s: %d examples, %d longer than %d tokens dropped.", name, len(indices), dropped,
               config.data.max_len)
  if not len(indices):
    raise DataError(
        f"{name} split of {raw.name}: none of its {len(raw.examples)} examples fits "
        f"data.max_len={config.data.max_len} ({dropped} have a side longer than that in tokens, "
        "EOS included; the others are empty). Raise data.max_len or check the data.")
  return Split(name, raw, corpus, indices)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The main job: prepare the data and the tokenizer, train (or resume), then evaluate on the
  test split (loss, perplexity, sacreBLEU, chrF) and print a few translations.

  Returns:
    The test metrics; after SIGTERM (preemption), only {"preempted": True, "step": step}: the
    checkpoint is saved, and the test runs when the same command, run again, finishes training.

  Raises:
    ConfigError, DataError, CheckpointError: before any work, naming the field, file or
      checkpoint (`errors.UserError`).
    NonFiniteError: if training diverged.
  """
  started = time.monotonic()  # Goodput counts what follows until the first step as startup.
  model_config = validate_run_config(config)
  workdir = paths.resolve(workdir)
  if config.init_from and not checkpoints.saved_steps(workdir):
    # A resumed run needs neither the directory nor its weights.
    marian.check_architecture(config.init_from, model_config)
  workdir.mkdir(parents=True, exist_ok=True)
  setup = make_setup(config)
  log.info("Mesh %s over %d devices (%d processes); machine: %s.", dict(setup.mesh.shape),
           jax.device_count(), jax.process_count(), cpu.machine_description())
  train_raw = hosts.once("the train split's text", lambda: sources.load_split(config.data, "train"),
                         timeout_minutes=config.data.prepare_timeout_minutes)
  tokenizer = load_tokenizer(config, workdir, train_raw)
  train_split = load_split(config, workdir, "train", tokenizer)
  validation = load_split(config, workdir, "validation", tokenizer)
  batches = pipeline.EpochBatches(
      train_split.corpus, train_split.indices, tokens_per_batch=config.data.tokens_per_batch,
      max_len=config.data.max_len, packing=config.data.packing, seed=config.seed, shuffle=True,
      num_epochs=None, **sharding.row_split(setup.mesh))
  _log_padding(batches)
  bleu_sample = validation.indices[:config.train.eval_bleu_sentences]
  validation_batches = eval_batches(config, setup, validation)  # Planned once, read every pass.

  def evaluate_validation(params, step):
    metrics = evaluate_loss(setup, params, validation_batches)
    if len(bleu_sample):
      scores, _ = translation_metrics(setup, params, config, validation, tokenizer, bleu_sample, beam_size=1)
      metrics.update(bleu_greedy=scores["bleu"], chrf_greedy=scores["chrf"])
    log.info("step %d validation: %s", step, _fmt(metrics))
    return metrics

  stop = trainer.StopRequests.for_run(config.train)
  try:
    initial_params = (lambda: marian.load_params(config.init_from, model_config)) if config.init_from else None
    state = trainer.train(config, workdir, setup, batches, evaluate_validation, stop=stop,
                          initial_params=initial_params, started=started)
  finally:
    stop.close()
  step = int(jax.device_get(state.step))
  if stop.reason == "sigterm":
    log.warning("Preempted at step %d: the checkpoint is saved, and running the same command again "
                "resumes; the test set is evaluated once training has finished.", step)
    return {"preempted": True, "step": step}

  params, chosen = choose_test_params(config, workdir, setup, state.params, step, validation,
                                      tokenizer, bleu_sample)
  test = load_split(config, workdir, "test", tokenizer)
  metrics = evaluate_loss(setup, params, eval_batches(config, setup, test))
  start = time.perf_counter()
  if config.train.test_sentences:
    test.indices = test.indices[:config.train.test_sentences]
  scores, hypotheses = translation_metrics(setup, params, config, test, tokenizer,
                                           tokenized_bleu=True)
  metrics.update(scores, decode_seconds=time.perf_counter() - start, step=step,
                 beam_size=config.decode.beam_size, machine=cpu.machine_description(), **chosen)
  if jax.process_index() == 0:
    metrics["minutes_to_bleu"] = minutes_to_bleu(read_metrics(workdir, "validation"))
  if jax.process_index() == 0:
    paths.write_text_atomic(workdir / "test_hypotheses.txt", "".join(h + "\n" for h in hypotheses))
    paths.write_text_atomic(workdir / "test_metrics.json", json.dumps(metrics, indent=2))
    print(f"\nTest ({test.raw.name}, {len(test.indices)} sentences, beam {config.decode.beam_size}): "
          f"sacreBLEU {scores['bleu']:.1f}, chrF {scores['chrf']:.1f}, tokenized BLEU "
          f"{scores['bleu_tokenized']:.1f} (the paper's recipe, not comparable with sacreBLEU), "
          f"loss {metrics['loss']:.3f}, "
          f"perplexity {metrics['perplexity']:.2f}\n  {scores['bleu_signature']}\n  parameters: "
          f"{chosen['test_params']}; validation greedy BLEU reached "
          + ", ".join(f"{b} at {'-' if m is None else f'{m:.1f} min'}"
                      for b, m in metrics["minutes_to_bleu"].items()))
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
