"""Goodput: the parts of a run's wall time add up to it, across attempts, and a resume counts the
steps it does again as lost to the restart."""

import time

import pytest

from tiny_run import tiny_batches, tiny_setup
from transformer_jax import trainer
from transformer_jax.goodput import PARTS, Goodput
from transformer_jax.metrics import read_metrics


def parts_sum(record):
  return sum(record[f"{part}_s"] for part in PARTS)


def test_the_parts_add_up_to_the_wall_time():
  goodput = Goodput(started=time.monotonic() - 1.0)  # One second of startup before this.
  goodput.start_training()
  goodput.add("compilation", 0.25)
  with goodput.time("steps"):
    time.sleep(0.05)
  record = goodput.record()
  assert record["wall_s"] == pytest.approx(parts_sum(record), abs=0.01)
  assert record["startup_s"] == pytest.approx(1.0, abs=0.05)
  assert record["goodput"] == pytest.approx(record["steps_s"] / record["wall_s"], abs=1e-3)
  assert record["other_s"] >= 0 and record["attempts"] == 1 and record["ended"] is None


def test_a_resumed_attempt_adds_to_the_totals_and_counts_steps_done_again_as_redone():
  first = Goodput().record()
  first.update(step=12, steps_s=30.0, wall_s=first["wall_s"] + 30.0, time=time.time() - 5.0)
  resumed = Goodput(previous=first)  # Crashed (ended None) 5 s ago after recording step 12.
  assert [resumed.step_part(s, first=s == 9) for s in (9, 10, 12, 13)] == [
      "compilation", "redone", "redone", "steps"]
  resumed.add("redone", 2.0)
  record = resumed.record()
  assert record["attempts"] == 2 and record["steps_s"] == pytest.approx(30.0)
  assert record["redone_s"] == pytest.approx(2.0) and record["between_runs_s"] == pytest.approx(5.0, abs=0.5)
  assert record["wall_s"] == pytest.approx(parts_sum(record), abs=0.01)
  # After a run that ended by its own steps or budget, the gap is nobody's loss.
  assert Goodput(previous={**first, "ended": "time"}).record()["between_runs_s"] == 0.0


def test_metrics_jsonl_holds_goodput_that_adds_up_across_a_resume(tmp_path, caplog):
  config, setup = tiny_setup(steps=8, checkpoint_every=4)
  trainer.train(config, str(tmp_path), setup, tiny_batches(config, setup))
  records = read_metrics(tmp_path, "goodput")
  assert [r["step"] for r in records][-1] == 8 and records[-1]["ended"] == "steps"
  assert records[-1]["compilation_s"] > 0 and records[-1]["checkpoints_s"] > 0
  # A crash after step 8 was recorded but before checkpoint 8 was complete: resumed from 4.
  (tmp_path / "checkpoints" / "8").rename(tmp_path / "lost-8")
  last = records[-1]
  with caplog.at_level("INFO", logger="transformer_jax.trainer"):
    trainer.train(config, str(tmp_path), setup, tiny_batches(config, setup))
  resumed = read_metrics(tmp_path, "goodput")[-1]
  assert resumed["attempts"] == 2 and resumed["redone_s"] > 0  # Steps 6 to 8 (5 compiled).
  assert resumed["steps_s"] == pytest.approx(last["steps_s"], abs=1e-3)  # None of them new.
  assert resumed["wall_s"] > last["wall_s"]
  for record in read_metrics(tmp_path, "goodput"):
    assert record["wall_s"] == pytest.approx(parts_sum(record), abs=0.01)
  assert "Goodput " in caplog.text and "over 2 attempts" in caplog.text
