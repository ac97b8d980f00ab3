"""What a run does with its validation passes (validation.py): the best point kept and tested,
early stopping, the overfitting warning, and the same decisions after a resume."""

import json
import logging
import os
import subprocess
import sys

import pytest

from tiny_run import ROOT, TIMEOUT
from transformer_jax import validation
from transformer_jax.config import base_config
from transformer_jax.metrics import read_metrics


def write_metrics(workdir, records):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def watch_config(**train):
  config = base_config()
  config.train.update(train)
  return config.train


def passes(*losses, start=0):
  """Validation and training records, a pass every 10 steps: (validation loss, training loss)."""
  records = []
  for i, (val, tr) in enumerate(losses):
    step = start + 10 * (i + 1)
    records += [{"step": step, "split": "train", "loss": tr},
                {"step": step, "split": "validation", "loss": val, "bleu_greedy": 10.0 - val}]
  return records


def test_the_best_pass_and_early_stopping_by_loss_and_by_bleu(tmp_path, monkeypatch):
  saved = []
  monkeypatch.setattr(validation.checkpoints, "save_best", lambda w, p, record: saved.append(record))
  write_metrics(tmp_path, [])
  watch = validation.ValidationWatch(tmp_path, watch_config(best_metric="loss",
                                                            early_stopping_passes=2), 0)
  assert not watch.after_pass(10, {"loss": 3.0}, None, 4.0)
  assert not watch.after_pass(20, {"loss": 2.0}, None, 3.0)
  assert not watch.after_pass(30, {"loss": 2.5}, None, 2.0)
  assert watch.after_pass(40, {"loss": 2.1}, None, 1.5)  # Two passes without beating 2.0.
  assert watch.best() == (20, 2.0) and [r["step"] for r in saved] == [10, 20]
  by_bleu = validation.ValidationWatch(tmp_path, watch_config(best_metric="bleu"), 0)
  by_bleu.after_pass(10, {"loss": 3.0, "bleu_greedy": 5.0}, None, 4.0)
  by_bleu.after_pass(20, {"loss": 3.1, "bleu_greedy": 7.0}, None, 3.0)
  assert by_bleu.best() == (20, 7.0) and not by_bleu.should_stop()  # No early stopping asked.


def test_a_resumed_run_rebuilds_the_history_up_to_its_checkpoint(tmp_path, monkeypatch):
  """Passes after the checkpoint the run resumes from are done again, so they are not counted;
  a pass logged twice (before and after a resume) counts once, as its last line says."""
  monkeypatch.setattr(validation.checkpoints, "save_best", lambda *a: None)
  records = passes((3.0, 4.0), (2.0, 3.0), (2.5, 2.0), (2.6, 1.5))
  records[-3]["loss"] = 9.9  # An earlier line of step 30, written again below.
  write_metrics(tmp_path, records + [{"step": 30, "split": "validation", "loss": 2.5}])
  watch = validation.ValidationWatch(tmp_path, watch_config(best_metric="loss",
                                                            early_stopping_passes=2), 30)
  assert [step for step, _, _ in watch.history] == [10, 20, 30]
  assert watch.best() == (20, 2.0) and watch.passes_since_best() == 1 and not watch.should_stop()
  finished = validation.ValidationWatch(tmp_path, watch_config(best_metric="loss",
                                                               early_stopping_passes=2), 40)
  assert finished.should_stop()  # The run that stopped at 40 has nothing left to train.


def test_rising_validation_loss_with_falling_training_loss_is_named_overfitting(tmp_path, caplog):
  write_metrics(tmp_path, [])
  watch = validation.ValidationWatch(tmp_path, watch_config(), 0)
  with caplog.at_level(logging.WARNING, logger="transformer_jax.validation"):
    for step, (val, tr) in enumerate([(2.0, 3.0), (2.1, 2.5), (2.2, 2.0)], 1):
      watch.after_pass(10 * step, {"loss": val}, None, tr)
    assert not caplog.records  # Two rises are not yet a trend.
    watch.after_pass(40, {"loss": 2.3}, None, 1.5)
  assert "overfitting" in caplog.text and "--config.model.dropout_rate" in caplog.text


@pytest.fixture(scope="module")
def conflicting_corpus(tmp_path_factory):
  """Training pairs map a sentence to its reversal, validation pairs to itself: the better the
  model learns the training task, the worse its validation loss becomes after a first fall."""
  import random
  directory = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  words = ["red", "old", "big", "cat", "dog", "river", "house", "went", "to", "the", "saw", "a"]
  specs = {}
  for split, n, reverse in (("train", 300, True), ("validation", 16, False), ("test", 8, True)):
    lines = []
    for _ in range(n):
      sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 7)))
      target = " ".join(reversed(sentence.split())) if reverse else sentence
      lines.append(f"{sentence}\t{target}\n")
    path = directory / f"{split}.tsv"
    path.write_text("".join(lines))
    specs[split] = str(path)
  return specs


def train_py(workdir, corpus, *overrides):
  cmd = [sys.executable, "train.py", "--config", "configs/text.py", "--workdir", str(workdir),
         f"--config.data.text_train={corpus['train']}",
         f"--config.data.text_validation={corpus['validation']}",
         f"--config.data.text_test={corpus['test']}", f"--config.data.data_dir={workdir}_tfds",
         "--config.model.vocab_size=64", "--config.model.d_model=32", "--config.model.d_ff=64",
         "--config.model.num_heads=2", "--config.model.num_layers=1",
         "--config.data.tokens_per_batch=512", "--config.data.tokenizer_max_sentences=1000",
         "--config.model.dropout_rate=0", "--config.train.label_smoothing=0",
         "--config.train.schedule=constant", "--config.train.learning_rate=3e-3",
         "--config.train.warmup_steps=10", "--config.train.time_budget_minutes=0",
         "--config.train.num_steps=400", "--config.train.eval_every=20",
         "--config.train.checkpoint_every=20", "--config.train.log_every=10",
         "--config.train.best_metric=loss", "--config.train.early_stopping_passes=2",
         "--config.train.eval_bleu_sentences=0", "--config.train.checkpoints_to_average=1",
         *overrides]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def test_train_py_stops_early_and_tests_the_best_parameters(tmp_path, conflicting_corpus):
  workdir = tmp_path / "run"
  result = train_py(workdir, conflicting_corpus)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Early stopping at step" in result.stderr, result.stderr[-3000:]
  passes_ = read_metrics(workdir, "validation")
  best = min(passes_, key=lambda r: r["loss"])
  stopped = passes_[-1]["step"]
  assert stopped < 400 and stopped - best["step"] == 2 * 20  # Two passes after the best one.
  tested = json.loads((workdir / "test_metrics.json").read_text())
  assert tested["step"] == stopped
  assert tested["test_params"].startswith(f"step {best['step']}, the best by validation loss")
  again = train_py(workdir, conflicting_corpus)  # Nothing left to train; the same test.
  assert again.returncode == 0 and "nothing left to train" in again.stderr
  assert json.loads((workdir / "test_metrics.json").read_text())["bleu"] == tested["bleu"]
