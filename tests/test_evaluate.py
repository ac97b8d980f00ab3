"""Evaluation: sacreBLEU and the paper's tokenized BLEU, time to quality, and corpus translation
giving the same text on any mesh and in any number of processes (the loss over a split:
tests/test_pipeline.py)."""

import json
import math
import pathlib
import sys

import pytest
import sacrebleu

from transformer_jax import evaluate

HYPOTHESES = ["The cat sat on the mat.", "A dog barked loudly at night", "Hello world"]
REFERENCES = ["The cat sat on a mat.", "The dog barked loudly at night.", "Hello, world!"]


def test_scores_equal_sacrebleus_own():
  scores = evaluate.score(HYPOTHESES, REFERENCES)
  assert scores["bleu"] == sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
  assert scores["chrf"] == sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score
  assert "tok:13a" in scores["bleu_signature"] and "case:mixed" in scores["bleu_signature"]
  with pytest.raises(ValueError, match="3 hypotheses for 2 references"):
    evaluate.score(HYPOTHESES, REFERENCES[:2])


def test_tokenized_bleu_is_the_papers_recipe_computed_by_hand():
  # Moses splits "groß." into "groß ." and keeps "Hotel-Zimmer" whole; the compound split makes it
  # "Hotel ##AT##-##AT## Zimmer". Then 7 tokens a side: 1-grams 6/7, 2-grams 4/6, 3-grams 2/5,
  # 4-grams 1/4, no brevity penalty.
  hypothesis, reference = ["Das Hotel-Zimmer ist groß."], ["Das Hotel-Zimmer war groß."]
  expected = 100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
  assert evaluate.tokenized_bleu(hypothesis, reference, "de") == pytest.approx(expected, abs=1e-9)
  # Unsplit (5 tokens: no 3-gram in common), unsmoothed BLEU would be 0; sacreBLEU differs again.
  assert evaluate.score(hypothesis, reference, "de")["bleu_tokenized"] == pytest.approx(expected)
  assert evaluate.score(hypothesis, reference)["bleu"] != pytest.approx(expected)
  # "a-b-c" splits as the script's regular expression does (non-overlapping): once, then "b-c".
  assert evaluate.COMPOUND.sub(r"\1 ##AT##-##AT## \2", "a-b-c") == "a ##AT##-##AT## b-c"
  assert evaluate.tokenized_bleu(["x y z w"], ["x y z w"], "en") == pytest.approx(100.0)
  # Brevity penalty, as multi-bleu.perl: 4 of 5 reference tokens, all matching.
  assert evaluate.tokenized_bleu(["a b c d"], ["a b c d e"], "en") == pytest.approx(100 * math.exp(1 - 5 / 4))


def test_minutes_to_bleu_is_the_first_validation_pass_that_reached_each_threshold():
  passes = [{"step": 250, "bleu_greedy": 4.0, "minutes": 4.1}, {"step": 500, "bleu_greedy": 12.5, "minutes": 8.0},
            {"step": 750, "bleu_greedy": 11.0, "minutes": 12.2}, {"step": 1000, "bleu_greedy": 20.0, "minutes": 16.3}]
  assert evaluate.minutes_to_bleu(passes) == {"10": 8.0, "20": 16.3, "25": None}
  assert evaluate.minutes_to_bleu([]) == {"10": None, "20": None, "25": None}


@pytest.mark.slow  # About three minutes: trains, then decodes in five processes; test_decode.py
# checks sharded decoding against unsharded in one process.
def test_decoding_across_processes_and_meshes_gives_the_same_translations(tmp_path):
  """A tiny run trained 300 steps (its outputs vary from sentence to sentence, and beam search
  differs from greedy on most), translated greedily and with beam 4 by 2 processes x 2 devices,
  by 1 process x 4 devices, by 8 devices with the parameters sharded (fsdp=8) and by 1 device."""
  import socket
  import subprocess

  root = pathlib.Path(__file__).resolve().parent.parent
  script = str(root / "tests" / "tiny_run.py")

  def run(out, devices=1, *extra, process_id=None, port=None):
    cmd = [sys.executable, script, "--workdir", str(tmp_path / "run"), "--steps", "300", "--checkpoint_every", "300", "--learn",
           "--devices", str(devices), *extra]
    if out:
      cmd += ["--translate", str(tmp_path / out)]
    if port is not None:
      cmd += ["--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(process_id)]
    return subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  def finish(*procs):
    try:
      outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
      for p in procs:
        p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

  finish(run(""))  # Train; the runs below restore the checkpoint and translate.
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  finish(*(run("multi.json", 2, process_id=i, port=port) for i in range(2)))
  finish(run("four.json", 4))
  finish(run("fsdp.json", 8, "--fsdp", "8"))
  finish(run("one.json", 1))
  one = json.loads((tmp_path / "one.json").read_text())
  assert len(one["1"]) == len(one["4"]) == 64
  assert len(set(one["4"])) > 32 and one["1"] != one["4"]  # Varied, and beam search is no greedy.
  for name in ("multi.json", "four.json", "fsdp.json"):
    assert json.loads((tmp_path / name).read_text()) == one, name
