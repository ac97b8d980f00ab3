"""Fault paths as the world produces them: bad config values, bad input bytes, damaged and
non-finite checkpoints, preemption and kill -9, each checked through the public commands and
functions, for its message, its exit status, and that nothing already saved is lost."""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_run import tiny_batches, tiny_setup
from transformer_jax import checkpoints, errors, trainer
from transformer_jax.cli import evaluate as evaluate_cli
from transformer_jax.cli import export as export_cli
from transformer_jax.cli import translate as translate_cli
from transformer_jax.config import base_config, validate_run_config
from transformer_jax.data import pipeline
from transformer_jax.runs import RunError, load_run
from transformer_jax.tokenizer import train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 300


def leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize("field, value, message", [
    ("train.checkpoint_every", 0, r"train.checkpoint_every=0 is not accepted; it must be a number >= 1"),
    ("train.log_every", 0, r"train.log_every=0 .* >= 1"),
    ("train.warmup_steps", 0, r"train.warmup_steps=0 .* >= 1"),
    ("data.tokens_per_batch", -256, r"data.tokens_per_batch=-256 .* >= 1"),
    ("train.num_steps", -5, r"train.num_steps=-5 .* >= 0"),
    ("model.vocab_size", 2, r"model.vocab_size=2 is too small"),
    ("train.adam_eps", 0.0, r"train.adam_eps=0.0 .* > 0.0"),
    ("train.label_smoothing", 1.0, r"train.label_smoothing=1.0 must be below 1"),
    ("train.cooldown_fraction", 1.0, r"train.cooldown_fraction=1.0 must be below 1"),
    ("train.cooldown_fraction", -0.2, r"train.cooldown_fraction=-0.2 .* >= 0.0"),
    ("train.schedule", "linear", r"train.schedule='linear' is not one of 'paper', 'cosine', 'constant'"),
    ("decode.beam_size", 0, r"decode.beam_size=0 .* >= 1"),
    ("data.tokens_per_batch", 64, r"data.tokens_per_batch=64 is smaller than data.max_len=256"),
    ("model.d_model", 510, r"d_model=510 is not divisible by num_heads=8"),
])
def test_every_bad_config_value_is_named_before_any_work(field, value, message):
  config = base_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(errors.ConfigError, match=message):
    validate_run_config(config)


def test_the_default_configs_are_valid():
  for name in ("small", "base", "big"):
    from transformer_jax.config import load_config_file
    validate_run_config(load_config_file(ROOT / "configs" / f"{name}.py"))


# ----------------------------------------------------------------------------- train.py


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
  """A small tab-separated corpus, one file per split."""
  directory = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  words = ["red", "old", "big", "cat", "dog", "river", "house", "went", "to", "the", "saw", "a"]
  specs = {}
  for split, n in (("train", 200), ("validation", 16), ("test", 16)):
    lines = []
    for _ in range(n):
      sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
      lines.append(f"{sentence}\t{' '.join(reversed(sentence.split()))}\n")
    path = directory / f"{split}.tsv"
    path.write_text("".join(lines))
    specs[split] = str(path)
  return specs


def train_py(workdir, corpus, *overrides, wait=True):
  cmd = [sys.executable, "train.py", "--workdir", str(workdir),
         "--config.data.dataset=text", f"--config.data.text_train={corpus['train']}",
         f"--config.data.text_validation={corpus['validation']}",
         f"--config.data.text_test={corpus['test']}", f"--config.data.data_dir={workdir}_tfds",
         "--config.model.vocab_size=64", "--config.model.d_model=32", "--config.model.d_ff=64",
         "--config.model.num_heads=2", "--config.model.num_layers=1",
         "--config.data.tokens_per_batch=512", "--config.data.tokenizer_max_sentences=1000",
         "--config.train.time_budget_minutes=0", "--config.train.log_every=1",
         "--config.train.eval_bleu_sentences=4", *overrides]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def test_train_py_names_a_bad_value_exits_2_without_a_traceback_and_prepares_nothing(tmp_path, text_corpus):
  result = train_py(tmp_path / "run", text_corpus, "--config.train.warmup_steps=0")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "train.py: error: train.warmup_steps=0 is not accepted" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run_tfds").exists()  # Nothing was prepared before the check.


def test_train_py_stops_at_once_when_no_example_fits_max_len(tmp_path, text_corpus):
  start = time.monotonic()
  result = train_py(tmp_path / "run", text_corpus, "--config.data.max_len=2",
                    "--config.data.tokens_per_batch=512")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "none of its 200 examples fits data.max_len=2 (200 have a side longer" in result.stderr
  assert "Traceback" not in result.stderr
  assert time.monotonic() - start < 120  # It used to spin forever in the batch plan.


def test_an_empty_epoch_plan_is_an_error_not_an_endless_loop():
  config, setup = tiny_setup(devices=jax.devices()[:1])
  batches = tiny_batches(config, setup)
  empty = pipeline.EpochBatches(batches.corpus, np.array([], np.int64), tokens_per_batch=256,
                                max_len=32, packing=True, seed=0, shuffle=True, num_epochs=None)
  with pytest.raises(errors.DataError, match="no batch can be made from 0 examples"):
    empty[0]


def test_sigterm_saves_and_exits_without_evaluating_the_test_set(tmp_path, text_corpus):
  workdir = tmp_path / "run"
  proc = train_py(workdir, text_corpus, "--config.train.num_steps=100000",
                  "--config.train.checkpoint_every=100000", wait=False)
  try:
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
      assert proc.poll() is None, proc.stdout.read()[-3000:]
      time.sleep(0.1)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
  finally:
    proc.kill()
  assert proc.returncode == 0, output[-3000:]
  assert time.monotonic() - signalled < 60
  assert "Preempted at step" in output and "Test (" not in output
  assert not (workdir / "test_metrics.json").exists()
  assert len(checkpoint_steps(workdir)) == 1


# ----------------------------------------------------------------------------- non-finite states


def test_non_finite_parameters_are_never_saved(tmp_path):
  # Adam with eps 0 divides 0 by 0 for embedding rows no batch has touched: NaN parameters after
  # step 1 from a finite loss.
  config, setup = tiny_setup(devices=jax.devices()[:1], adam_eps=0.0, checkpoint_every=1, log_every=1)
  with pytest.raises(errors.NonFiniteError, match="non-finite .* by step 1; they are not saved .*"
                                                  "no checkpoint was saved before"):
    trainer.train(config, str(tmp_path), setup, tiny_batches(config, setup))
  assert checkpoint_steps(tmp_path) == []


def save_nan_checkpoint(workdir, config, setup, step):
  state = setup.init_state(0)
  state = state.replace(step=jnp.int32(step),
                        params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  manager = checkpoints.make_manager(str(workdir), config.train)
  checkpoints.save(manager, state, {"next_index": step}, config)
  manager.wait_until_finished()
  manager.close()


# ----------------------------------------------------------------------------- damaged checkpoints


def truncate_array_data(step_dir):
  files = sorted((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  largest = files[-1]
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 3])


def empty_the_directory(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


DAMAGE = {
    "truncated array file": truncate_array_data,
    "no _METADATA": lambda d: (d / "state" / "_METADATA").unlink(),
    "no manifest.ocdbt": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "no data/metadata": lambda d: (d / "data" / "metadata").unlink(),
    "empty step directory": empty_the_directory,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A straight 8-step run, and a run stopped at 6 with checkpoints 2, 4 and 6, in one process."""
  root = tmp_path_factory.mktemp("runs")
  config, setup = tiny_setup(devices=jax.devices()[:1], steps=8, checkpoint_every=2, log_every=2)
  straight = leaves(trainer.train(config, str(root / "straight"), setup, tiny_batches(config, setup)))
  config.train.num_steps = 6
  trainer.train(config, str(root / "stopped"), setup, tiny_batches(config, setup))
  config.train.num_steps = 8
  return {"config": config, "setup": setup, "straight": straight, "stopped": root / "stopped"}


@pytest.mark.parametrize("damage", sorted(DAMAGE) + ["non-finite values"])
def test_training_falls_back_past_a_damaged_newest_checkpoint(runs, damage, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(runs["stopped"], workdir)
  config, setup = runs["config"], runs["setup"]
  if damage == "non-finite values":
    shutil.rmtree(workdir / "checkpoints" / "6")
    save_nan_checkpoint(workdir, config, setup, 6)
  else:
    DAMAGE[damage](workdir / "checkpoints" / "6")
  with caplog.at_level("WARNING", logger="transformer_jax"):
    state = trainer.train(config, str(workdir), setup, tiny_batches(config, setup))
  log = caplog.text
  assert "Skipping checkpoint 6" in log and "resuming from checkpoint 4 instead" in log, log
  moved = list((workdir / "damaged_checkpoints").iterdir())
  assert [p.name.split("-")[0] for p in moved] == ["6"]
  # Resumed from 4: the same state as the straight run, to the bit.
  for a, b in zip(runs["straight"], leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert checkpoint_steps(workdir)[-1] == 8


def test_training_stops_rather_than_start_over_when_no_checkpoint_restores(runs, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(runs["stopped"], workdir)
  for step in (2, 4, 6):
    truncate_array_data(workdir / "checkpoints" / str(step))
  config, setup = runs["config"], runs["setup"]
  with pytest.raises(errors.CheckpointError, match="none of the 3 checkpoints .* restores .*"
                                                   "Nothing was changed"):
    trainer.train(config, str(workdir), setup, tiny_batches(config, setup))
  assert checkpoint_steps(workdir) == [2, 4, 6]


# ----------------------------------------------------------------------------- translate


@pytest.fixture(scope="module")
def run_dir(runs, tmp_path_factory):
  """The stopped run with a tokenizer of its vocabulary size, so that it translates."""
  workdir = tmp_path_factory.mktemp("translate") / "run"
  shutil.copytree(runs["stopped"], workdir)
  sentences = [f"the {a} {b} went to the {c}" for a in ("red", "old", "big") for b in ("cat", "dog")
               for c in ("market", "river", "house")] * 5
  train_tokenizer(sentences, vocab_size=runs["config"].model.vocab_size).save(workdir / "tokenizer.model")
  return workdir


@pytest.mark.parametrize("damage", sorted(DAMAGE) + ["non-finite values"])
def test_translate_names_a_damaged_checkpoint(runs, run_dir, damage, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(run_dir, workdir)
  if damage == "non-finite values":
    shutil.rmtree(workdir / "checkpoints" / "6")
    save_nan_checkpoint(workdir, runs["config"], runs["setup"], 6)
  else:
    DAMAGE[damage](workdir / "checkpoints" / "6")
  code = translate_cli.main(["--workdir", str(workdir), "--beam_size", "1", "the red cat"])
  err = capsys.readouterr().err
  if damage == "no data/metadata":
    assert code == 0, err  # Translation does not need the data position.
    return
  assert code == 2, err
  assert "translate: error: checkpoint 6 in" in err and "[2, 4, 6]" in err and "--step" in err, err
  assert "does not match its own config" not in err
  # The earlier checkpoint still translates.
  assert translate_cli.main(["--workdir", str(workdir), "--step", "4", "--beam_size", "1",
                             "the red cat"]) == 0


def test_translate_names_the_file_and_line_of_bad_bytes(run_dir, tmp_path, capsys, monkeypatch):
  bad = tmp_path / "input.txt"
  bad.write_bytes(b"the red cat\nthe \xff dog\n")
  assert translate_cli.main(["--workdir", str(run_dir), "--input", str(bad)]) == 2
  assert f"{bad}, line 2: invalid UTF-8 at byte 4" in capsys.readouterr().err
  utf16 = tmp_path / "utf16.txt"
  utf16.write_bytes("the red cat\n".encode("utf-16"))
  assert translate_cli.main(["--workdir", str(run_dir), "--input", str(utf16)]) == 2
  assert f"{utf16}, line 1: invalid UTF-8" in capsys.readouterr().err
  stdin = type("Stdin", (), {"buffer": __import__("io").BytesIO(b"ok\n\xc3(\n")})()
  monkeypatch.setattr(sys, "stdin", stdin)
  assert translate_cli.main(["--workdir", str(run_dir)]) == 2
  assert "standard input, line 2: invalid UTF-8" in capsys.readouterr().err
  # An argument holding bytes that are not UTF-8 (Python keeps them as surrogates).
  assert translate_cli.main(["--workdir", str(run_dir), "ok", b"\xff".decode("utf-8", "surrogateescape")]) == 2
  assert "sentence argument 2: invalid UTF-8" in capsys.readouterr().err


def test_average_last_zero_is_refused(run_dir, capsys):
  for main, rest in ((translate_cli.main, ["x"]),
                     (evaluate_cli.main, ["--source_file", "x", "--reference_file", "y"]),
                     (export_cli.main, ["--output_dir", "y"])):
    with pytest.raises(SystemExit) as exit_info:
      main(["--workdir", str(run_dir), "--average_last", "0", *rest])
    assert exit_info.value.code == 2
    assert "--average_last: 0 is not a positive integer" in capsys.readouterr().err
  with pytest.raises(RunError, match="average_last=0"):
    load_run(str(run_dir), average_last=0)


# ----------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_random_kill_9s_including_during_saves_never_change_the_result(tmp_path):
  """SIGKILL at random moments (saves run every step, so many land in one), then resume, until
  the run finishes: the final state equals a straight run's, bit for bit."""
  run = [sys.executable, str(ROOT / "tests" / "tiny_run.py"), "--steps", "16", "--checkpoint_every", "1"]
  subprocess.run(run + ["--workdir", str(tmp_path / "straight"), "--dump", str(tmp_path / "straight.npz")],
                 cwd=ROOT, check=True, capture_output=True, timeout=TIMEOUT)
  rng = random.Random(1)
  workdir = tmp_path / "killed"
  kills = 0
  for _ in range(20):
    proc = subprocess.Popen(run + ["--workdir", str(workdir), "--dump", str(tmp_path / "killed.npz"),
                                   "--step_sleep", "0.2"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    # Kill once training is under way (a new checkpoint has appeared), at a random moment.
    before = checkpoint_steps(workdir)[-1] if (workdir / "checkpoints").exists() else 0
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
      if (workdir / "checkpoints").exists() and any(s > before for s in checkpoint_steps(workdir)):
        break
      time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.5))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=30)
      kills += 1
    else:
      output = proc.stdout.read()
      assert proc.returncode == 0 and "finished at step 16" in output, output[-2000:]
      break
  assert kills >= 3
  with np.load(tmp_path / "straight.npz") as a, np.load(tmp_path / "killed.npz") as b:
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key])


# ----------------------------------------------------------------------------- time to quality


@pytest.mark.slow  # About a minute of training; test_trainer.py checks the average itself.
def test_the_test_uses_the_checkpoint_average_only_when_validation_prefers_it(tmp_path, text_corpus):
  workdir = tmp_path / "run"
  flags = ["--config.train.num_steps=6", "--config.train.checkpoint_every=2", "--config.train.eval_every=2",
           "--config.train.checkpoints_to_average=3", "--config.train.test_sentences=4"]
  result = train_py(workdir, text_corpus, *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((workdir / "test_metrics.json").read_text())
  final, average = metrics["validation_bleu_final"], metrics["validation_bleu_average"]
  assert metrics["test_params"] == ("average of steps [2, 4, 6]" if average > final else "step 6")
  assert set(metrics["minutes_to_bleu"]) == {"10", "20", "25"}
  assert "validation greedy BLEU reached 10 at" in result.stdout
  minutes = [json.loads(line)["minutes"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert minutes == sorted(minutes) and minutes[0] > 0
  # A resumed run's clock goes on from where the first one stopped.
  result = train_py(workdir, text_corpus, *flags[1:], "--config.train.num_steps=8")
  assert result.returncode == 0, result.stderr[-3000:]
  resumed = [json.loads(line)["minutes"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert resumed[:len(minutes)] == minutes and min(resumed[len(minutes):]) > minutes[-1]
  assert json.loads((workdir / "test_metrics.json").read_text())["test_params"] in (
      "average of steps [4, 6, 8]", "step 8")
