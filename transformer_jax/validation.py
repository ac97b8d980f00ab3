"""What a run learns from its validation passes: the best point so far, when to stop early, and
when it overfits.

Section 6.1 tests the average of the last checkpoints; on a small corpus the last ones are often
past the best point (the validation loss turns up while the training loss still falls). With
`train.best_metric` the run keeps its best parameters by validation ("bleu": the greedy BLEU of
the validation sample; "loss": the validation loss) in `workdir/best`, a candidate for the test
beside the final and averaged parameters (`evaluate.choose_test_params`). With
`train.early_stopping_passes` = N it stops once N passes in a row have not improved on the best.
Whatever the settings, it warns when the validation loss has risen for several passes while the
training loss fell, naming the settings that regularise.

The watch's memory is the run's validation history: a resumed run rebuilds it from
`metrics.jsonl` up to the step it resumes from (process 0 reads it, every process gets it), so
it takes the decisions a straight run takes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from transformer_jax import checkpoints, paths
from transformer_jax.metrics import read_metrics

log = logging.getLogger(__name__)

METRICS = {"bleu": ("bleu_greedy", max), "loss": ("loss", min)}  # config.BEST_METRICS -> (key, better)
RISING_PASSES = 3  # Validation loss up this many passes in a row, training loss down: overfitting.


class ValidationWatch:
  """Follows the validation passes of one run (see the module's docstring)."""

  def __init__(self, workdir: str, train: ml_collections.ConfigDict, resumed_step: int):
    self.workdir = paths.resolve(workdir)
    self.metric = str(train.get("best_metric", ""))
    self.patience = int(train.get("early_stopping_passes", 0))
    self.key, self.better = METRICS.get(self.metric, (None, None))
    self.history = _history(self.workdir, resumed_step)  # [(step, validation metrics, train loss)]
    self.stopped_early = False

  def best(self) -> tuple[int, float] | None:
    """(step, value) of the best pass so far by `train.best_metric`, or None."""
    scored = [(step, m[self.key]) for step, m, _ in self.history if self.key in m]
    if not scored:
      return None
    value = self.better(v for _, v in scored)
    return next((s, v) for s, v in scored if v == value)

  def passes_since_best(self) -> int:
    best = self.best()
    return 0 if best is None else sum(1 for step, _, _ in self.history if step > best[0])

  def should_stop(self) -> bool:
    """Whether early stopping has ended the run: `early_stopping_passes` passes in a row without
    a better value. Every process gets the same answer (the history is the same)."""
    return self.patience > 0 and self.key is not None and self.passes_since_best() >= self.patience

  def after_pass(self, step: int, metrics: dict[str, float], params: Any,
                 train_loss: float | None) -> bool:
    """Takes a validation pass at `step`: keeps the parameters if they are the best so far, warns
    about overfitting, and says whether to stop (early stopping)."""
    before = self.best()
    self.history.append((step, dict(metrics), train_loss))
    if self.key is not None and self.key in metrics and self.best() != before:
      checkpoints.save_best(self.workdir, params,
                            {"step": step, "metric": self.metric, "value": float(metrics[self.key])})
    self._warn_if_overfitting(step)
    if self.should_stop():
      best_step, value = self.best()
      log.warning("Early stopping at step %d: validation %s has not improved for %d passes (best "
                  "%.4g at step %d; train.early_stopping_passes=%d).", step, self.key,
                  self.passes_since_best(), value, best_step, self.patience)
      self.stopped_early = True
    return self.stopped_early

  def _warn_if_overfitting(self, step: int) -> None:
    recent = [(m.get("loss"), t) for _, m, t in self.history[-(RISING_PASSES + 1):]]
    if len(recent) <= RISING_PASSES or any(v is None or t is None for v, t in recent):
      return
    validation, training = zip(*recent)
    if all(b > a for a, b in zip(validation, validation[1:])) and training[-1] < training[0]:
      log.warning(
          "Validation loss has risen for %d passes (%.3f -> %.3f) while training loss fell "
          "(%.3f -> %.3f) by step %d: the model is overfitting. Regularise it "
          "(--config.model.dropout_rate, --config.train.label_smoothing), make it smaller "
          "(--config.model.d_model, --config.model.num_layers), give it more data, or keep the best "
          "point and stop there (--config.train.best_metric=loss, "
          "--config.train.early_stopping_passes=3).", RISING_PASSES, validation[0], validation[-1],
          training[0], training[-1], step)


def _history(workdir, resumed_step: int) -> list[tuple[int, dict, float | None]]:
  """The validation passes up to `resumed_step` in `metrics.jsonl` (the last line of each step:
  a resumed run writes the passes after its checkpoint again), each with the training loss last
  logged before it; process 0's reading, broadcast to every process."""
  text = ""
  if jax.process_index() == 0:
    passes: dict[int, tuple[dict, float | None]] = {}
    train_loss = None
    for record in read_metrics(workdir):
      if record.get("step", 0) > resumed_step:
        continue
      if record.get("split") == "train":
        train_loss = record.get("loss")
      elif record.get("split") == "validation":
        passes[record["step"]] = (record, train_loss)
    text = json.dumps([[s, m, t] for s, (m, t) in sorted(passes.items())])
  if jax.process_count() > 1:
    text = _broadcast_text(text)
  return [(int(s), m, t) for s, m, t in json.loads(text or "[]")]


def _broadcast_text(text: str) -> str:
  """Process 0's `text` on every process."""
  data = np.frombuffer(text.encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
  padded = np.zeros(size, np.uint8)
  padded[:min(size, data.size)] = data[:size]
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))).decode()
