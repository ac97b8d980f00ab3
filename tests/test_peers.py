"""A lost process in a two-process run on 127.0.0.1: killed (kill -9) or stopped (SIGSTOP), the
other one stops with one line and exit status 75, promptly when a collective fails and within the
heartbeat bound when only silence tells; running both again resumes bit-identical to a straight
run."""

import re
import signal
import subprocess
import time

import pytest

from tiny_run import (TIMEOUT, assert_bitwise_equal, load_dump, run_two_processes,
                      start_two_processes)
from transformer_jax import peers
from transformer_jax.distributed import service_heartbeat_timeout

STEPS = 24
HEARTBEAT_S = 10.0  # tiny_run's --heartbeat default: train.heartbeat_timeout_seconds.
LINE = re.compile(r"^tiny_run\.py: error: process 1 of 2 was lost after step (\d+) \((.*)\); every "
                  r"process stops \(exit status 75, retryable\)\. Running the same command again on "
                  r"every process resumes the run from checkpoint (\d+) in \S+checkpoints \(this "
                  r"process ran: python \S+tiny_run\.py .*--process_id 0 .*\)$", re.M)


def test_the_coordination_service_waits_longer_than_the_watch():
  assert service_heartbeat_timeout(10) == 20 and service_heartbeat_timeout(100) == 150
  assert peers.EXIT_CODE == 75


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The state of a straight two-process run of STEPS steps."""
  tmp = tmp_path_factory.mktemp("straight")
  run_two_processes(tmp / "run", STEPS, "--dump", str(tmp / "straight.npz"), devices=1)
  return load_dump(tmp / "straight.npz")


@pytest.mark.slow  # About 90 s here (2 cores): a run until checkpoint 8, the loss, the resume.
@pytest.mark.parametrize("lose, reason, bound_s", [
    # A dead peer fails the next collective at once.
    (signal.SIGKILL, r"a collective failed: .*Gloo.*", 5.0),
    # A stopped one fails nothing: its heartbeats stop, and the bound passes.
    (signal.SIGSTOP, r"no heartbeat for 10 s: stopped, hung or dead", HEARTBEAT_S + 4.0),
], ids=["kill-9", "SIGSTOP"])
def test_a_lost_process_stops_the_other_with_one_line_and_the_run_resumes(
    straight, tmp_path, lose, reason, bound_s):
  workdir = tmp_path / "run"
  logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
  # One device each: with two, a killed peer's collective may hang on the survivor's other device
  # instead of failing, and the heartbeat bound is what stops it (seen here: 10.3 s).
  procs = start_two_processes(workdir, STEPS, "--step_sleep", "0.3", devices=1, outputs=logs)
  try:
    deadline = time.monotonic() + TIMEOUT
    while not (workdir / "checkpoints" / "8").is_dir():
      assert time.monotonic() < deadline and procs[0].poll() is None, "no checkpoint 8"
      time.sleep(0.2)
    time.sleep(1.0)  # Mid-way between checkpoints.
    procs[1].send_signal(lose)
    lost_at = time.monotonic()
    returncode = procs[0].wait(timeout=bound_s + 30)
    took = time.monotonic() - lost_at
  finally:
    for proc in procs:
      if lose == signal.SIGSTOP:
        proc.send_signal(signal.SIGCONT)
      proc.kill()
  logs[0].seek(0)
  output = logs[0].read()
  assert returncode == 75, output[-3000:]
  assert took < bound_s, f"took {took:.1f} s"
  print(f"{lose.name}: the survivor stopped {took:.1f} s after its peer was lost")
  match = LINE.search(output)
  assert match and re.fullmatch(reason, match[2]), output[-3000:]
  assert int(match[3]) >= 8 and int(match[1]) >= int(match[3])
  assert len(re.findall(r"error:", output)) == 1
  assert "Traceback" not in output and "Check failure" not in output

  run_two_processes(workdir, STEPS, "--dump", str(tmp_path / "resumed.npz"), devices=1)
  assert_bitwise_equal(load_dump(tmp_path / "resumed.npz"), straight)
