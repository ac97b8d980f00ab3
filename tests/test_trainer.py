"""Training: the step, sharding, checkpoints, resumption, preemption and multi-process runs.

The tests that need fresh processes drive `tests/tiny_run.py` (a tiny model on made-up data).
"""

import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_run
from tiny_run import tiny_batches, tiny_setup
from transformer_jax import base_config, checkpoints, errors, steps, trainer
from transformer_jax.optim import find_cooldown, learning_rate_schedule
from transformer_jax.data import pipeline, token_cache

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_RUN = str(ROOT / "tests" / "tiny_run.py")
TIMEOUT = 240  # Hard limit on every subprocess.


def run_tiny(workdir, steps, *extra, devices=1, check=True):
  cmd = [sys.executable, TINY_RUN, "--workdir", str(workdir), "--steps", str(steps),
         "--devices", str(devices), *extra]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
  if check and result.returncode != 0:
    raise AssertionError(f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
  return result


def load_dump(path):
  with np.load(path) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def assert_bitwise_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_the_learning_rate_schedule_is_the_papers_formula():
  schedule = learning_rate_schedule(base_config().train, 512)  # warmup_steps = 4000
  for step in (1, 100, 4000, 4001, 20000, 100000):
    expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
    np.testing.assert_allclose(float(schedule(step - 1)), expected, rtol=1e-6)


def test_a_tiny_model_overfits_one_batch():
  config, _ = tiny_setup(label_smoothing=0.0, schedule="constant", learning_rate=3e-3, warmup_steps=1)
  config.model.dropout_rate = 0.0
  setup = steps.make_setup(config, jax.devices()[:1])
  batch = setup.put_batch(tiny_batches(config, setup)[0])
  state = setup.init_state(0)
  key = jax.random.key(0)
  for _ in range(300):
    state, metrics = setup.train_step(state, batch, key)
  loss = float(metrics["loss"]) / float(metrics["tokens"])
  assert loss < 0.05, loss
  assert float(metrics["correct"]) == float(metrics["tokens"])


@pytest.mark.slow  # About 45 s; tests/test_sharding.py trains on four meshes against one device.
def test_loss_on_eight_devices_equals_loss_on_one():
  config, one = tiny_setup(devices=jax.devices()[:1])
  _, eight = tiny_setup(devices=jax.devices()[:8])
  assert eight.mesh.shape["data"] == 8
  local = tiny_batches(config, eight)[0]
  results = []
  for setup in (one, eight):
    state = setup.init_state(0)
    evaluated = setup.eval_step(state.params, setup.put_batch(local))
    _, trained = setup.train_step(state, setup.put_batch(local), jax.random.key(1))
    results.append([float(evaluated["loss"]), float(trained["loss"]), float(trained["grad_norm"])])
  np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


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


def test_the_cooldown_takes_the_learning_rate_to_zero_and_resumes_bit_for_bit(tmp_path):
  """cooldown_fraction 0.5 of 8 steps: the rate is multiplied by 1 up to step 4 (counted from 0),
  then (8 - step) / 4. A run preempted in the cooldown ends where the straight run does; one
  resumed from a checkpoint saved before the cooldown was switched on places it the same way."""
  run_tiny(tmp_path / "straight", 8, "--cooldown", "0.5", "--dump", str(tmp_path / "straight.npz"))
  result = run_tiny(tmp_path / "resumed", 8, "--cooldown", "0.5", "--sigterm_at", "6")
  assert "finished at step 6" in result.stdout
  run_tiny(tmp_path / "resumed", 8, "--cooldown", "0.5", "--dump", str(tmp_path / "resumed.npz"))
  straight = load_dump(tmp_path / "straight.npz")
  assert_bitwise_equal(straight, load_dump(tmp_path / "resumed.npz"))
  assert np.array_equal(straight[-1], [4, 8, 0])  # The plan is part of the state (its last leaf).
  schedule = learning_rate_schedule(tiny_run.tiny_run_config(8).train, 32)
  rates = {m["step"]: m["learning_rate"] for m in trainer.read_metrics(tmp_path / "straight", "train")}
  # Each logged rate is that of the window's last step, `step - 1` counted from 0.
  for step, factor in ((2, 1.0), (4, 1.0), (6, 0.75), (8, 0.25)):
    np.testing.assert_allclose(rates[step], float(schedule(step - 1)) * factor, rtol=1e-6)
  # Switched on at a resume: the plan is part of the optimiser state, so the run refuses with a
  # message that names the field, and changes nothing.
  run_tiny(tmp_path / "switched_on", 4)
  result = run_tiny(tmp_path / "switched_on", 8, "--cooldown", "0.5", check=False)
  assert result.returncode != 0
  assert "saved with train.cooldown_fraction=0.0" in result.stdout + result.stderr
  assert checkpoints.saved_steps(tmp_path / "switched_on") == [4]


def test_the_time_budgets_cooldown_ends_the_run_with_the_budget(tmp_path):
  """With a time budget, the cooldown starts when its last fraction begins and is aimed at its
  end at the recent steps per second; the run stops with the budget, the rate near zero."""
  config, setup = tiny_setup(steps=10**6, time_budget_minutes=0.25, cooldown_fraction=0.5,
                             checkpoint_every=10**6, log_every=5)
  batches = tiny_batches(config, setup)
  # Compiled first, so that the 15 s budget is for steps even where compiling takes most of it (a
  # busy CI machine): the budget counts compilation, the pace its cooldown is aimed with does not.
  setup.train_step(setup.init_state(0), setup.put_batch(batches[0]), jax.random.key(0))
  state = trainer.train(config, tmp_path, setup, batches)
  first, end, by_time = (int(x) for x in jax.device_get(find_cooldown(state.opt_state).plan))
  # The plan's end stopped the run, or the budget did a little earlier (a slower last stretch).
  assert by_time == 1 and first < end and int(state.step) <= end, (first, end, state.step)
  logged = trainer.read_metrics(tmp_path, "train")
  # Training ended with the 15 s budget (the metrics' clock and the budget's start together),
  # give or take a few steps.
  assert abs(60 * logged[-1]["minutes"] - 15.0) < 2.5, (logged[-1], first, end)
  # The cooldown's factor (the logged rate over the paper's): 1, then falling (re-aimed as the
  # pace changes, at another slope but never up) to near zero.
  schedule = learning_rate_schedule(config.train, config.model.d_model)
  factors = [m["learning_rate"] / float(schedule(m["step"] - 1)) for m in logged]
  assert abs(factors[0] - 1.0) < 1e-5 and factors[-1] < 0.2, factors
  assert all(b <= a * 1.01 for a, b in zip(factors, factors[1:])), factors
  restored, _ = checkpoints.restore(checkpoints.make_manager(tmp_path, config.train), setup)
  assert [int(x) for x in jax.device_get(find_cooldown(restored.opt_state).plan)] == [first, end, 1]
  if int(state.step) == end:  # Run again, the finished run has nothing left to train.
    again = trainer.train(config, tmp_path, setup, tiny_batches(config, setup))
    assert int(again.step) == end


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(workdir, steps, *extra):
  """tests/tiny_run.py as two processes of 2 devices each under jax.distributed; their outputs."""
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, TINY_RUN, "--workdir", str(workdir), "--steps", str(steps), "--devices", "2",
       "--num_processes", "2", "--process_id", str(i), "--coordinator", f"127.0.0.1:{port}", *extra],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
  return outputs


def test_two_processes_equal_one_process_bit_for_bit(tmp_path):
  run_two_processes(tmp_path / "multi", 6, "--dump", str(tmp_path / "multi.npz"))
  # The single process also runs under jax.distributed, so that both runs reduce gradients with
  # the same collective implementation (gloo): in-process all-reduce sums in another order, which
  # Adam amplifies from rounding differences into visible ones within a few steps.
  run_tiny(tmp_path / "single", 6, "--dump", str(tmp_path / "single.npz"), "--coordinator",
           f"127.0.0.1:{free_port()}", devices=4)
  assert_bitwise_equal(load_dump(tmp_path / "single.npz"), load_dump(tmp_path / "multi.npz"))


@pytest.mark.slow  # About a minute; two processes equal one in the test above.
def test_two_processes_agree_on_the_time_budgets_cooldown(tmp_path):
  """Each process measures its own steps per second; the cooldown's end is process 0's estimate,
  so both place the same plan at the same step and stop together."""
  outputs = run_two_processes(tmp_path / "multi", 10**6, "--checkpoint_every", str(10**6),
                              "--budget_minutes", "0.5", "--cooldown", "0.5")
  finished = [next(line for line in o.splitlines() if line.startswith("finished")) for o in outputs]
  assert finished[0] == finished[1] and "cooldown [" in finished[0], finished
  first, end, by_time = map(int, finished[0].split("[")[1].rstrip("]").split())
  assert by_time == 1 and first < end < 10**6, finished


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


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, TINY_RUN, "--workdir", str(workdir), "--steps", "1000",
                           "--checkpoint_every", "1000", "--step_sleep", "0.2"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + TIMEOUT
  while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=60)[0]
  assert proc.returncode == 0, output[-3000:]
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 4 <= steps[0] < 1000
  assert f"finished at step {steps[0]}" in output


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


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_a_tiny_model_learns_to_reverse_sequences_exactly(dtype):
  """Trained on made-up pairs whose target is the reversed source, greedy decoding of held-out
  sources gives their exact reversals; computing in bfloat16 (parameters, softmax, loss and the
  optimiser in float32) learns it as well."""
  from transformer_jax import translation
  config, _ = tiny_setup(label_smoothing=0.0, schedule="constant", learning_rate=2e-3, warmup_steps=50)
  config.model.update(dict(dropout_rate=0.0, d_model=64, d_ff=128, vocab_size=16, max_len=16, dtype=dtype))
  config.data.tokens_per_batch = 512
  setup = steps.make_setup(config, jax.devices()[:1])
  rng = np.random.default_rng(0)
  def reversal_corpus(n):
    lengths = rng.integers(2, 8, n)  # EOS included.
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    src = rng.integers(4, 16, offsets[-1]).astype(np.uint16)
    src[offsets[1:] - 1] = 1
    tgt = src.copy()
    for i in range(n):
      tgt[offsets[i]:offsets[i + 1] - 1] = src[offsets[i]:offsets[i + 1] - 1][::-1]
    return token_cache.TokenizedCorpus(src, offsets, tgt, offsets.copy())
  corpus = reversal_corpus(4000)
  batches = pipeline.EpochBatches(corpus, np.arange(len(corpus)), tokens_per_batch=512, max_len=16,
                                  packing=True, seed=0, shuffle=True, num_epochs=None)
  state, key = setup.init_state(0), jax.random.key(0)
  for k in range(900):
    state, metrics = setup.train_step(state, setup.put_batch(batches[k]), key)
  held_out = reversal_corpus(32)
  src = np.zeros((32, 8), np.int32)
  for i in range(32):
    src[i, :len(held_out.source(i))] = held_out.source(i)
  out = np.asarray(translation.translate(setup.model, state.params, jnp.asarray(src), beam_size=1,
                                         alpha=0.0, max_extra_len=2))
  exact = sum(np.array_equal(out[i, :len(held_out.target(i))], held_out.target(i)) for i in range(32))
  assert exact == 32, f"{exact}/32 exact reversals"
