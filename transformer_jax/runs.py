"""A trained run, loaded from its workdir to translate with: the tokenizer, the config saved with
its checkpoints, and the parameters of one checkpoint or the average of its last few (section 6.1:
the paper averages the last 5 for base models, 20 for big ones).

  run = runs.load_run("runs/quickstart", average_last=5)
  run.translate(["Am Anfang war das Wort."])

The commands (`translate`, `transformer-evaluate`, `transformer-export`) load runs this way; the
errors they can meet (a workdir that is missing, empty or inconsistent, a damaged checkpoint) are
user errors that name the workdir or the checkpoint and what to do about it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from transformer_jax import accelerators, checkpoints, evaluate, paths
from transformer_jax.config import decode_tokens_per_batch
from transformer_jax.data import token_cache
from transformer_jax.errors import CheckpointError, UserError
from transformer_jax.steps import Setup, make_setup
from transformer_jax.tokenizer import MARIAN_TOKENIZER_DIR, MarianVocabTokenizer, Tokenizer, load_run_tokenizer


log = logging.getLogger(__name__)


class RunError(UserError, ValueError):
  """A workdir that cannot be used for translation: missing, empty or inconsistent."""


@dataclasses.dataclass
class Run:
  """A trained run ready to translate: its config, model, mesh, parameters and tokenizer."""

  config: ml_collections.ConfigDict
  setup: Setup
  params: Any
  tokenizer: Tokenizer | MarianVocabTokenizer
  steps: list[int]  # The checkpoints the parameters come from (several when averaged).

  def translate(self, sentences: Sequence[str], *, beam_size: int | None = None,
                alpha: float | None = None, max_extra_len: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Detokenized translations of `sentences`, in order (batched by length, as in training, and
    each batch shrinking as its translations end: `translation.CompactingDecoder`);
    `progress(sentences, tokens)` after each batch (`evaluate.translate_corpus`)."""
    decode_cfg = self.config.decode
    ids = [self.tokenizer.encode(s) for s in sentences]
    lengths = np.asarray([len(x) for x in ids])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((t for x in ids for t in x), np.int32, int(lengths.sum()))
    corpus = token_cache.TokenizedCorpus(flat, offsets, flat, offsets)  # Targets unused.
    max_len = max(int(lengths.max(initial=1)), int(self.config.data.max_len))
    return evaluate.translate_corpus(
        self.setup, self.params, corpus, np.arange(len(sentences)),
        self.tokenizer, tokens_per_batch=decode_tokens_per_batch(self.config),
        max_len=max_len,
        beam_size=decode_cfg.beam_size if beam_size is None else beam_size,
        alpha=decode_cfg.length_penalty if alpha is None else alpha,
        max_extra_len=decode_cfg.max_extra_len if max_extra_len is None else max_extra_len,
        compact=True, progress=progress)


def load_run(workdir: str, *, average_last: int = 1, step: int | None = None) -> Run:
  """Loads a run's tokenizer and checkpoint (or the average of its last `average_last`) onto the
  local devices, with the config saved in the checkpoint.

  Raises:
    RunError: if the workdir does not exist, has no checkpoint or tokenizer, or they disagree.
    CheckpointError: naming the checkpoint, if one that is needed does not restore.
  """
  if isinstance(average_last, bool) or not isinstance(average_last, int) or average_last < 1:
    raise RunError(f"average_last={average_last!r}: average at least 1 checkpoint (1: the last alone)")
  workdir = paths.resolve(workdir)
  if not workdir.is_dir():
    raise RunError(f"workdir {workdir} does not exist; train a model first "
                   f"(python train.py --workdir {workdir})")
  steps = checkpoints.saved_steps(workdir)
  tokenizer = load_run_tokenizer(workdir)
  if not steps or tokenizer is None:
    missing = "checkpoints" if not steps else f"tokenizer.model (nor {MARIAN_TOKENIZER_DIR}/)"
    raise RunError(f"workdir {workdir} has no {missing}; is it a training run's workdir?")
  if step is not None and step not in steps:
    raise RunError(f"workdir {workdir} has no checkpoint at step {step}; it has {steps}")
  used = [step] if step is not None else steps[-average_last:]
  manager = checkpoints.make_manager(workdir, ml_collections.ConfigDict(
      {"checkpoints_to_keep": len(steps), "checkpoints_to_average": 1}))
  try:
    config = _explain(checkpoints.restore_config, steps)(manager, used[-1])
    for axis, size in (("data", -1), ("fsdp", 1), ("tensor", 1)):
      config.mesh[axis] = size  # Translate on whatever devices are here.
    if config.model.attention_impl == "cudnn" and not all(
        map(accelerators.supports_cudnn_attention, jax.devices())):
      # cuDNN's kernel computes the same function as XLA's: a run trained on a GPU translates anywhere.
      config.model.attention_impl = "dot_product"
      log.info("%s was trained with cuDNN's attention, which these devices lack: XLA's instead.", workdir)
    if tokenizer.vocab_size != config.model.vocab_size:
      raise RunError(f"the tokenizer in {workdir} has {tokenizer.vocab_size} pieces but the "
                     f"checkpoint's model has vocab_size={config.model.vocab_size}")
    setup = make_setup(config)
    params = _explain(checkpoints.average, steps)(manager, setup, steps=used)
  finally:
    manager.close()
  return Run(config, setup, params, tokenizer, used)


def _explain(restore: Callable, steps: list[int]) -> Callable:
  """`restore`, whose CheckpointError also lists the run's checkpoints and how to pick another."""
  def wrapped(*args, **kwargs):
    try:
      return restore(*args, **kwargs)
    except CheckpointError as e:
      raise CheckpointError(f"{e}. The run has checkpoints {steps}: pass --step with another one "
                            "(and --average_last 1), or move the damaged one away") from e
  return wrapped
