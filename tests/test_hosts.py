"""Multi-process preparation: process 0 prepares and tokenizes each split once, the other processes
wait for it and read what it wrote, and a failure on process 0 reaches them at once."""

import os
import pathlib
import subprocess
import sys

from tiny_run import free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 300
ENGLISH = [f"the {a} {b} went to the {c}" for a in ("red", "old", "big", "small") for b in ("cat", "dog", "bird")
           for c in ("market", "river", "house")]
GERMAN = [f"die {a} {b} ging zum {c}" for a in ("rote", "alte", "grosse", "kleine") for b in ("Katze", "Hund", "Vogel")
          for c in ("Markt", "Fluss", "Haus")]


def main_job_on_two_processes(tmp_path, *overrides):
  files = {}
  for split, pairs in (("train", list(zip(ENGLISH, GERMAN)) * 3), ("validation", list(zip(ENGLISH, GERMAN))[:8]),
                       ("test", list(zip(ENGLISH, GERMAN))[8:12])):
    files[split] = tmp_path / f"{split}.tsv"
    files[split].write_text("".join(f"{en}\t{de}\n" for en, de in pairs))
  port = free_port()
  flags = [f"--workdir={tmp_path / 'run'}", "--config.data.dataset=text",
           *(f"--config.data.text_{split}={path}" for split, path in files.items()),
           f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.model.vocab_size=48",
           "--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.num_heads=4",
           "--config.model.num_layers=1", "--config.model.max_len=32", "--config.data.tokens_per_batch=256",
           "--config.train.num_steps=3", "--config.train.time_budget_minutes=0",
           "--config.train.eval_bleu_sentences=0", "--config.train.samples_to_print=0",
           "--config.train.checkpoint_every=3", "--config.data.prepare_timeout_minutes=3", *overrides]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  procs = [subprocess.Popen([sys.executable, "train.py", *flags, f"--coordinator_address=127.0.0.1:{port}",
                             "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=TIMEOUT))
    finally:
      proc.kill()
  return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs)]


def test_process_0_prepares_and_tokenizes_and_the_other_reads(tmp_path):
  (rc0, out0, err0), (rc1, out1, err1) = main_job_on_two_processes(tmp_path)
  assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])
  for split in ("train", "validation", "test"):
    assert f"{split}: tokenizing" in err0
    assert f"Waiting for process 0 to prepare the {split} split" in err1
  assert "tokenizing" not in err1  # It read process 0's cache.
  assert "Waiting for process 0 to prepare the tokenizer" in err1
  assert "Test (" in out0  # Both trained on the same global batches and reached the test.


def test_a_failure_on_process_0_stops_the_others_with_its_reason(tmp_path):
  # A vocabulary far too large for this text: SentencePiece refuses it on process 0.
  (rc0, _, err0), (rc1, _, err1) = main_job_on_two_processes(tmp_path, "--config.model.vocab_size=5000")
  assert rc0 == 2 and "SentencePiece cannot train" in err0
  assert rc1 == 2 and "process 0 could not prepare the tokenizer: process 0 failed: ConfigError" in err1
