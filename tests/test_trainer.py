"""The training loop (trainer.py): resumption bit for bit, two processes equal to one, SIGTERM,
and a non-finite loss. The tests that need fresh processes drive `tests/tiny_run.py` (a tiny model
on made-up data); the step itself is tested in test_steps.py, checkpoints in test_checkpoints.py,
the cooldown in test_cooldown.py.
"""

import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from tiny_run import (ROOT, TIMEOUT, TINY_RUN, assert_bitwise_equal, free_port, load_dump, run_tiny,
                      run_two_processes, tiny_batches, tiny_setup)
from transformer_jax import errors, trainer


@pytest.mark.slow  # About 80 s; the cooldown's resume test below also resumes bit for bit, after a SIGTERM.
def test_resumed_run_equals_straight_run_bit_for_bit(tmp_path):
  run_tiny(tmp_path / "straight", 8, "--dump", str(tmp_path / "straight.npz"))
  run_tiny(tmp_path / "resumed", 4, "--checkpoint_every", "4")
  result = run_tiny(tmp_path / "resumed", 8, "--dump", str(tmp_path / "resumed.npz"))
  assert "finished at step 8" in result.stdout
  assert_bitwise_equal(load_dump(tmp_path / "straight.npz"), load_dump(tmp_path / "resumed.npz"))
  # The data position is checkpointed with the state: both runs stand at the same batch.
  for run in ("straight", "resumed"):
    data_state = (tmp_path / run / "checkpoints" / "8" / "data" / "metadata").read_text()
    assert '"next_index": 8' in data_state


def test_two_processes_equal_one_process_bit_for_bit(tmp_path):
  run_two_processes(tmp_path / "multi", 6, "--dump", str(tmp_path / "multi.npz"))
  # The single process also runs under jax.distributed, so that both runs reduce gradients with
  # the same collective implementation (gloo): in-process all-reduce sums in another order, which
  # Adam amplifies from rounding differences into visible ones within a few steps.
  run_tiny(tmp_path / "single", 6, "--dump", str(tmp_path / "single.npz"), "--coordinator",
           f"127.0.0.1:{free_port()}", devices=4)
  assert_bitwise_equal(load_dump(tmp_path / "single.npz"), load_dump(tmp_path / "multi.npz"))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, TINY_RUN, "--workdir", str(workdir), "--steps", "1000",
                           "--checkpoint_every", "1000", "--step_sleep", "0.2"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + TIMEOUT
  # Two train records (steps 2 and 4; each comes with a goodput record): the run is past step 4
  # when the signal comes, whenever the loop reads it.
  while time.monotonic() < deadline and not (
      metrics.exists() and metrics.read_text().count('"split": "train"') >= 2):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=60)[0]
  assert proc.returncode == 0, output[-3000:]
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 4 <= steps[0] < 1000
  assert f"finished at step {steps[0]}" in output


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  config, setup = tiny_setup(checkpoint_every=2, log_every=2)
  config.train.num_steps = 8
  step_fn = setup.train_step
  def poisoned(state, batch, key):
    state, metrics = step_fn(state, batch, key)
    bad = int(state.step) >= 5
    return state, {**metrics, "loss": metrics["loss"] * (jnp.nan if bad else 1.0)}
  setup.train_step = poisoned
  with pytest.raises(errors.NonFiniteError, match="step 5.*last good checkpoint \\(step 4\\)"):
    trainer.train(config, str(tmp_path), setup, tiny_batches(config, setup))
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


