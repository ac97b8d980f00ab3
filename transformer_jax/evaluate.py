"""Translation quality: sacreBLEU and chrF on detokenized output against the raw references.

BLEU in the paper is tokenized BLEU on newstest2014. Here the primary number is sacreBLEU (cased,
13a tokenization, detokenized hypotheses against untokenized references) with its signature, so
that figures are comparable across papers and tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import sacrebleu
from jax.experimental import multihost_utils

from transformer_jax import decode, sharding
from transformer_jax.data import pipeline


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
  """Corpus BLEU (cased, 13a) and chrF of detokenized `hypotheses` against raw `references`."""
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
  bleu = sacrebleu.metrics.BLEU(tokenize="13a", lowercase=False)
  chrf = sacrebleu.metrics.CHRF()
  bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
  chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
  return {
      "bleu": bleu_score.score,
      "chrf": chrf_score.score,
      "bleu_signature": str(bleu.get_signature()),
      "chrf_signature": str(chrf.get_signature()),
  }


def translate_corpus(model, params: Any, mesh: jax.sharding.Mesh, corpus: pipeline.TokenizedCorpus,
                     indices: np.ndarray, tokenizer, *, tokens_per_batch: int, max_len: int,
                     beam_size: int, alpha: float, max_extra_len: int) -> list[str]:
  """Translates the sources of `corpus[indices]`, batched by length, in the order of `indices`.

  Every process takes part (the batch is sharded over the mesh); every process gets all the
  translations back.
  """
  batches = pipeline.EpochBatches(
      corpus, np.asarray(indices), tokens_per_batch=tokens_per_batch, max_len=max_len,
      packing=False, seed=0, shuffle=False, num_epochs=1,
      multiple_of=sharding.batch_multiple(mesh),
      process_index=jax.process_index(), process_count=jax.process_count())
  translate = decode.make_translate_fn(model, beam_size, alpha, max_extra_len)
  plan = batches.plan(0)
  output: dict[int, str] = {}
  with jax.set_mesh(mesh):
    for k in range(len(plan)):
      src = sharding.global_batch({"src": batches[k]["src"]}, mesh)["src"]
      tokens = translate(params, src)
      tokens = (np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
                if jax.process_count() > 1 else np.asarray(jax.device_get(tokens)))
      for row, (i,) in enumerate(plan.rows[k]):
        output[i] = tokenizer.decode(tokens[row])
  return [output[int(i)] for i in indices]
