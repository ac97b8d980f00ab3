"""sacreBLEU scoring, loading a run, and the translate and evaluate commands."""

import io
import json
import math
import pathlib
import sys

import jax
import pytest
import sacrebleu

import tiny_run
from transformer_jax import checkpoints, evaluate, steps
from transformer_jax.tokenizer import train_tokenizer

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


SENTENCES = [f"the {a} {b} went to the {c}" for a in ("red", "old", "big") for b in ("cat", "dog")
             for c in ("market", "river", "house")] * 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A workdir as training leaves it: a tokenizer and two checkpoints of a tiny model."""
  workdir = tmp_path_factory.mktemp("run")
  tokenizer = train_tokenizer(SENTENCES, vocab_size=48)
  tokenizer.save(workdir / "tokenizer.model")
  config = tiny_run.tiny_run_config(steps=4)
  config.model.vocab_size = 48
  setup = steps.make_setup(config, jax.devices()[:1])
  state = setup.init_state(0)
  manager = checkpoints.make_manager(str(workdir), config.train)
  for step in (1, 2):
    state = state.replace(step=state.step + 1)
    checkpoints.save(manager, state, {"next_index": step}, config)
  manager.wait_until_finished()
  manager.close()
  return workdir


def test_translate_command_reads_arguments_files_and_stdin(run_dir, tmp_path, capsys, monkeypatch):
  assert evaluate.translate_main(["--workdir", str(run_dir), "--beam_size", "2", "the red cat", "the dog"]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 2
  source = tmp_path / "in.txt"
  source.write_text("the old dog\nthe big cat\nthe house\n")
  assert evaluate.translate_main(["--workdir", str(run_dir), "--input", str(source)]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 3
  monkeypatch.setattr(sys, "stdin", io.StringIO("went to the river\n"))
  assert evaluate.translate_main(["--workdir", str(run_dir), "--beam_size", "1"]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 1


def test_translate_command_explains_an_unusable_workdir(run_dir, tmp_path, capsys):
  assert evaluate.translate_main(["--workdir", str(tmp_path / "nowhere"), "x"]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert evaluate.translate_main(["--workdir", str(tmp_path), "x"]) == 2
  assert "has no checkpoints" in capsys.readouterr().err
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "checkpoints").symlink_to(run_dir / "checkpoints")
  train_tokenizer(SENTENCES, vocab_size=40).save(broken / "tokenizer.model")
  assert evaluate.translate_main(["--workdir", str(broken), "x"]) == 2
  assert "has 40 pieces but the checkpoint's model has vocab_size=48" in capsys.readouterr().err


def test_evaluate_command_scores_files_with_averaged_checkpoints(run_dir, tmp_path, capsys):
  source, reference = tmp_path / "src.txt", tmp_path / "ref.txt"
  source.write_text("the red cat\nthe old dog went\n")
  reference.write_text("die rote Katze\nder alte Hund ging\n")
  code = evaluate.evaluate_main(["--workdir", str(run_dir), "--source_file", str(source),
                                 "--reference_file", str(reference), "--average_last", "2",
                                 "--output_dir", str(tmp_path / "out")])
  assert code == 0, capsys.readouterr().err
  scores = json.loads((tmp_path / "out" / "src.txt.scores.json").read_text())
  hypotheses = (tmp_path / "out" / "src.txt.hypotheses.txt").read_text().splitlines()
  assert scores["checkpoints"] == [1, 2] and len(hypotheses) == 2
  assert scores["bleu"] == sacrebleu.corpus_bleu(hypotheses, [["die rote Katze", "der alte Hund ging"]]).score


class CompileCounter:
  """Counts XLA compilations inside a `with` block: jax's backend-compile events, and the programs
  it loads from the persistent compilation cache instead (which the test run shares between
  processes, tests/conftest.py)."""

  def __enter__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen_duration)
    jax.monitoring.register_event_listener(self._listen)
    return self

  def _listen_duration(self, event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def _listen(self, event, **kwargs):
    del kwargs
    if event == "/jax/compilation_cache/cache_hits":
      self.count += 1

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen_duration)
    jax.monitoring.unregister_event_listener(self._listen)


def test_decoding_compiles_once_per_shape_for_the_whole_run(run_dir):
  run = evaluate.load_run(str(run_dir))
  sentences = ["the red cat went to the market", "the old dog", "the big dog went to the house"]
  for beam_size in (1, 2):  # Greedy, as validation decodes, and beam search, as the test does.
    with CompileCounter() as first:
      expected = run.translate(sentences, beam_size=beam_size)
    for _ in range(2):  # Two more passes over the same shapes, as later validations make.
      with CompileCounter() as again:
        assert run.translate(sentences, beam_size=beam_size) == expected
      assert again.count == 0, f"beam {beam_size}: {again.count} compilations on a repeated pass"
    assert first.count >= 1


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
