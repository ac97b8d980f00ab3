"""Evaluation: sacreBLEU and chrF of translations, the paper's tokenized BLEU, the loss over a
split, and the choice of the parameters a run's test translates with.

BLEU in the paper is tokenized BLEU on newstest2014. Here the primary number is sacreBLEU (cased,
13a tokenization, detokenized hypotheses against untokenized references) with its signature, so
that figures are comparable across papers and tools; `tokenized_bleu` gives the paper's figure
beside it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import sacrebleu
from jax.experimental import multihost_utils

from transformer_jax import checkpoints, sharding, translation
from transformer_jax.config import decode_tokens_per_batch
from transformer_jax.constants import PAD_ID
from transformer_jax.data import pipeline, token_cache
from transformer_jax.steps import Setup

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Split:
  """One split of the corpus, tokenized, and the examples that fit `data.max_len`."""

  name: str
  raw: Any  # data.sources.ParallelData
  corpus: token_cache.TokenizedCorpus
  indices: np.ndarray

  def references(self, indices: np.ndarray | None = None) -> list[str]:
    indices = self.indices if indices is None else indices
    return [self.raw.examples[int(i)][self.raw.target_lang].decode("utf-8") for i in indices]

  def sources(self, indices: np.ndarray) -> list[str]:
    return [self.raw.examples[int(i)][self.raw.source_lang].decode("utf-8") for i in indices]


def score(hypotheses: Sequence[str], references: Sequence[str], target_lang: str | None = None
          ) -> dict[str, Any]:
  """Corpus BLEU (cased, 13a) and chrF of detokenized `hypotheses` against raw `references`, and,
  given the target language, the paper's tokenized BLEU (`tokenized_bleu`) as "bleu_tokenized"."""
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
  bleu = sacrebleu.metrics.BLEU(tokenize="13a", lowercase=False)
  chrf = sacrebleu.metrics.CHRF()
  bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
  chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
  scores = {
      "bleu": bleu_score.score,
      "chrf": chrf_score.score,
      "bleu_signature": str(bleu.get_signature()),
      "chrf_signature": str(chrf.get_signature()),
  }
  if target_lang:
    scores["bleu_tokenized"] = tokenized_bleu(hypotheses, references, target_lang)
  return scores


COMPOUND = re.compile(r"(\S)-(\S)")  # get_ende_bleu.sh's s{(\S)-(\S)}{$1 ##AT##-##AT## $2}g


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str], lang: str) -> float:
  """BLEU as the paper's Table 2 reports it (tensor2tensor's get_ende_bleu.sh): both sides
  Moses-tokenized (tokenizer.perl -l LANG, via sacremoses), hyphenated compounds split
  ("Hotel-Zimmer" -> "Hotel ##AT##-##AT## Zimmer"), then multi-bleu.perl's cased corpus BLEU (no
  smoothing). Not comparable with sacreBLEU: the same output reads about 1 to 1.5 higher here
  (tensor2tensor's base model: 27.5 sacreBLEU, 29.0 this way)."""
  from sacremoses import MosesTokenizer

  tokenizer = MosesTokenizer(lang=lang)

  def prepare(text: str) -> str:
    tokens = tokenizer.tokenize(text, return_str=True)
    return COMPOUND.sub(r"\1 ##AT##-##AT## \2", tokens)

  bleu = sacrebleu.metrics.BLEU(tokenize="none", smooth_method="none", force=True)
  return bleu.corpus_score([prepare(h) for h in hypotheses], [[prepare(r) for r in references]]).score


def translate_corpus(setup: Setup, params: Any, corpus: token_cache.TokenizedCorpus,
                     indices: np.ndarray, tokenizer, *, tokens_per_batch: int, max_len: int,
                     beam_size: int, alpha: float, max_extra_len: int, compact: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> list[str]:
  """Translates the sources of `corpus[indices]`, batched by length, in the order of `indices`.

  Every process takes part (the batch is sharded over the setup's mesh); every process gets all
  the translations back. The decoding program is the one `translation.translator` keeps for the
  setup's model and mesh: compiled once per batch shape for the whole run, not once per call.
  With `compact` (serving: `Run.translate`), finished examples leave each batch as it decodes
  (`translation.CompactingDecoder`: faster, more programs to compile).
  `progress(sentences, tokens)`, if given, is called after each batch with its number of
  sentences and of output tokens (EOS included), for a progress bar and a throughput.
  """
  batches = pipeline.EpochBatches.single_pass(corpus, indices, tokens_per_batch=tokens_per_batch,
                                              max_len=max_len, **sharding.row_split(setup.mesh))
  translate = translation.translator(setup.model, setup.mesh, setup.rules).fn(
      beam_size, alpha, max_extra_len, compact=compact)
  mesh = setup.mesh
  plan = batches.plan(0)
  output: dict[int, str] = {}
  for k in range(len(plan)):
    src = sharding.global_batch({"src": batches[k]["src"]}, mesh)["src"]
    tokens = translate(params, src)
    tokens = (np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
              if jax.process_count() > 1 else np.asarray(jax.device_get(tokens)))
    rows = plan.batch_rows(k)
    for row, (i,) in enumerate(rows):
      output[i] = tokenizer.decode(tokens[row])
    if progress is not None:
      progress(len(rows), int(np.count_nonzero(tokens[:len(rows)] != PAD_ID)))
  return [output[int(i)] for i in indices]


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


def eval_batches(config: ml_collections.ConfigDict, setup: Setup, split: Split) -> pipeline.EpochBatches:
  """Every example of the split exactly once (never dropped), for the loss: packed into rows of
  `data.max_len` when training packs (one batch shape: the quick start's first validation pass
  compiled 9 programs for its 9 bucket shapes), otherwise bucketed by length and padded."""
  return pipeline.EpochBatches.single_pass(
      split.corpus, split.indices, tokens_per_batch=config.data.tokens_per_batch,
      max_len=config.data.max_len, packing=config.data.packing, **sharding.row_split(setup.mesh))


def translation_metrics(setup: Setup, params: Any, config: ml_collections.ConfigDict, split: Split,
                        tokenizer, indices: np.ndarray | None = None, beam_size: int | None = None,
                        tokenized_bleu: bool = False) -> tuple[dict[str, Any], list[str]]:
  """sacreBLEU and chrF of the model's translations of `split` (or of its `indices`), and the
  paper's tokenized BLEU if asked (the test reports it; validation passes do not need it)."""
  indices = split.indices if indices is None else indices
  hypotheses = translate_corpus(
      setup, params, split.corpus, indices, tokenizer,
      tokens_per_batch=decode_tokens_per_batch(config), max_len=config.data.max_len,
      beam_size=config.decode.beam_size if beam_size is None else beam_size,
      alpha=config.decode.length_penalty, max_extra_len=config.decode.max_extra_len)
  target_lang = split.raw.target_lang if tokenized_bleu else None
  return score(hypotheses, split.references(indices), target_lang), hypotheses


def choose_test_params(config: ml_collections.ConfigDict, workdir, setup: Setup, final: Any,
                       step: int, validation: Split, tokenizer, bleu_sample: np.ndarray
                       ) -> tuple[Any, dict[str, Any]]:
  """The parameters the test translates with, chosen on validation (never on the test) among:
  the final ones; the average of the last `train.checkpoints_to_average` checkpoints (section
  6.1), when that is 2 or more; and the best by `train.best_metric` (validation.py), when the run
  kept one at another step. With more than one, the highest greedy BLEU on the validation sample
  wins (the final parameters on a tie); without a sample, the best ones do.

  Returns:
    The parameters and a record of the choice for the test metrics: "test_params" (which), and
    each candidate's validation BLEU.
  """
  candidates: dict[str, tuple[str, Any]] = {"final": (f"step {step}", final)}
  steps = checkpoints.saved_steps(workdir)[-config.train.checkpoints_to_average:]
  if config.train.checkpoints_to_average >= 2 and len(steps) >= 2 and len(bleu_sample):
    manager = checkpoints.make_manager(workdir, config.train)
    try:
      candidates["average"] = (f"average of steps {steps}", checkpoints.average(manager, setup, steps=steps))
    finally:
      manager.close()
  if config.train.get("best_metric") and (best := checkpoints.restore_best(workdir, setup)):
    params, record = best
    if int(record["step"]) != step:
      candidates["best"] = (f"step {record['step']}, the best by validation {record['metric']} "
                            f"({record['value']:.4g})", params)
  if len(candidates) == 1:
    return final, {"test_params": candidates["final"][0]}
  if not len(bleu_sample):
    name = "best" if "best" in candidates else "final"
    return candidates[name][1], {"test_params": candidates[name][0]}
  bleu = {name: translation_metrics(setup, params, config, validation, tokenizer, bleu_sample,
                                    beam_size=1)[0]["bleu"]
          for name, (_, params) in candidates.items()}
  chosen = max(bleu, key=lambda name: (bleu[name], name == "final"))
  log.info("Validation greedy BLEU: %s; the test uses the %s parameters (%s).",
           ", ".join(f"{name} {value:.2f}" for name, value in bleu.items()), chosen,
           candidates[chosen][0])
  return candidates[chosen][1], {"test_params": candidates[chosen][0],
                                 **{f"validation_bleu_{name}": value for name, value in bleu.items()}}


def minutes_to_bleu(validation: list[dict], thresholds=(10, 20, 25)) -> dict[str, float | None]:
  """MLPerf-style time to quality: the run's minutes at the first validation pass whose greedy
  BLEU reached each threshold (None: never)."""
  reached = {}
  for threshold in thresholds:
    first = next((r for r in validation if r.get("bleu_greedy", -1) >= threshold and "minutes" in r), None)
    reached[str(threshold)] = None if first is None else first["minutes"]
  return reached
