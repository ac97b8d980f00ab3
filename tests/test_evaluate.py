"""sacreBLEU scoring, loading a run, and the translate and evaluate commands."""

import io
import json
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
