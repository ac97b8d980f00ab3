"""Checkpoints (checkpoints.py): restored onto other device counts and shardings, averaged, and
complete after a kill -9 during a save. Damaged checkpoints are in test_reliability.py."""

import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tiny_run import (ROOT, TIMEOUT, TINY_RUN, assert_bitwise_equal, load_dump, run_tiny,
                      tiny_setup)
from transformer_jax import checkpoints


@pytest.mark.parametrize("fsdp", [1, 8])
def test_a_checkpoint_saved_on_eight_devices_restores_on_one_and_two(tmp_path, fsdp):
  # Saved data-parallel or fully sharded (fsdp=8), restored replicated (data=1 and data=2).
  run_tiny(tmp_path / "run", 4, "--dump", str(tmp_path / "saved.npz"), "--fsdp", str(fsdp), devices=8)
  saved = load_dump(tmp_path / "saved.npz")
  for n in (1, 2):
    config, setup = tiny_setup(devices=jax.devices()[:n])
    manager = checkpoints.make_manager(str(tmp_path / "run"), config.train)
    state, data_state = checkpoints.restore(manager, setup)
    manager.close()
    assert data_state == {"next_index": 4}
    assert len(jax.tree.leaves(state)[0].sharding.device_set) == n
    assert_bitwise_equal(saved, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))])


def test_checkpoint_averaging_is_the_mean_of_the_parameters(tmp_path):
  run_tiny(tmp_path / "run", 6, "--checkpoint_every", "2")
  config, setup = tiny_setup()
  manager = checkpoints.make_manager(str(tmp_path / "run"), config.train)
  assert manager.all_steps() == [2, 4, 6]
  params = [checkpoints.restore(manager, setup, s)[0].params for s in (4, 6)]
  averaged = checkpoints.average(manager, setup, last=2)
  manager.close()
  for a, p4, p6 in zip(jax.tree.leaves(averaged), *map(jax.tree.leaves, params)):
    np.testing.assert_allclose(a, (np.asarray(p4) + np.asarray(p6)) / 2, rtol=1e-6)


def test_kill_during_save_then_restart_resumes_from_a_complete_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  run_tiny(tmp_path / "straight", 12, "--dump", str(tmp_path / "straight.npz"), "--checkpoint_every", "1")
  proc = subprocess.Popen([sys.executable, TINY_RUN, "--workdir", str(workdir), "--steps", "12",
                           "--checkpoint_every", "1", "--step_sleep", "0.3"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = workdir / "checkpoints"
  deadline = time.monotonic() + TIMEOUT
  while time.monotonic() < deadline and not (checkpoints.exists() and len(list(checkpoints.iterdir())) >= 4):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # Saves run every step, so one is usually in flight.
  proc.wait(timeout=30)
  result = run_tiny(workdir, 12, "--dump", str(tmp_path / "resumed.npz"), "--checkpoint_every", "1")
  assert "finished at step 12" in result.stdout
  assert_bitwise_equal(load_dump(tmp_path / "straight.npz"), load_dump(tmp_path / "resumed.npz"))
