"""The commands: translate and transformer-evaluate on a saved run (arguments, files, standard
input, exit statuses and messages), and the flags that choose a run's checkpoints, shared by
translate, transformer-evaluate and transformer-export (transformer-compile: tests/test_aot.py;
exporting: tests/test_marian.py; bad input and damaged checkpoints: tests/test_reliability.py)."""

import io
import json
import re
import sys

import pytest
import sacrebleu

from test_runs import saved_run
from transformer_jax import runs
from transformer_jax.cli import evaluate as evaluate_cli
from transformer_jax.cli import export as export_cli
from transformer_jax.cli import translate as translate_cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return saved_run(tmp_path_factory.mktemp("run"))


def test_translate_command_reads_arguments_files_and_stdin(run_dir, tmp_path, capsys, monkeypatch):
  assert translate_cli.main(["--workdir", str(run_dir), "--beam_size", "2", "the red cat", "the dog"]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 2
  source = tmp_path / "in.txt"
  source.write_text("the old dog\nthe big cat\nthe house\n")
  assert translate_cli.main(["--workdir", str(run_dir), "--input", str(source)]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 3
  monkeypatch.setattr(sys, "stdin", io.StringIO("went to the river\n"))
  assert translate_cli.main(["--workdir", str(run_dir), "--beam_size", "1"]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 1


def test_translate_command_translates_a_file_in_order_and_reports_its_throughput(run_dir, tmp_path, capsys):
  """A file in length-sorted batches (Run.translate), written back in the input's order; the
  throughput goes to standard error, which the progress bar leaves alone when not a terminal."""
  sentences = ["the old dog went to the market", "the cat", "went", "the big red dog went to the river"]
  source = tmp_path / "in.txt"
  source.write_text("".join(f"{s}\n" for s in sentences))
  assert translate_cli.main(["--workdir", str(run_dir), "--beam_size", "1", "--input", str(source)]) == 0
  out, err = capsys.readouterr()
  assert out.splitlines() == runs.load_run(str(run_dir)).translate(sentences, beam_size=1)
  assert re.fullmatch(r"translated 4 sentences \(\d+ output tokens\) in [\d.]+ s: [\d.]+ sentences/s, "
                      r"\d+ tokens/s \(compilation included\)\n", err), err


def test_translate_command_explains_an_unusable_workdir(run_dir, tmp_path, capsys):
  assert translate_cli.main(["--workdir", str(tmp_path / "nowhere"), "x"]) == 2
  assert "translate: error: workdir" in (err := capsys.readouterr().err) and "does not exist" in err
  assert translate_cli.main(["--workdir", str(tmp_path), "x"]) == 2
  assert "has no checkpoints" in capsys.readouterr().err
  assert translate_cli.main(["--workdir", str(run_dir), "--step", "7", "x"]) == 2
  assert "has no checkpoint at step 7; it has [1, 2]" in capsys.readouterr().err


def test_evaluate_command_scores_files_with_averaged_checkpoints(run_dir, tmp_path, capsys):
  source, reference = tmp_path / "src.txt", tmp_path / "ref.txt"
  source.write_text("the red cat\nthe old dog went\n")
  reference.write_text("die rote Katze\nder alte Hund ging\n")
  code = evaluate_cli.main(["--workdir", str(run_dir), "--source_file", str(source),
                            "--reference_file", str(reference), "--average_last", "2",
                            "--output_dir", str(tmp_path / "out")])
  assert code == 0, capsys.readouterr().err
  scores = json.loads((tmp_path / "out" / "src.txt.scores.json").read_text())
  hypotheses = (tmp_path / "out" / "src.txt.hypotheses.txt").read_text().splitlines()
  assert scores["checkpoints"] == [1, 2] and len(hypotheses) == 2
  assert scores["bleu"] == sacrebleu.corpus_bleu(hypotheses, [["die rote Katze", "der alte Hund ging"]]).score
  assert "sacreBLEU" in capsys.readouterr().out
  reference.write_text("die rote Katze\n")
  assert evaluate_cli.main(["--workdir", str(run_dir), "--source_file", str(source),
                            "--reference_file", str(reference)]) == 2
  assert "has 2 lines but" in capsys.readouterr().err


def test_every_command_chooses_checkpoints_with_the_same_flags(capsys):
  """translate, transformer-evaluate and transformer-export take --workdir, --average_last and
  --step from one definition (cli/common.py), help text included (--average_last 0 refused:
  tests/test_reliability.py)."""
  for main in (translate_cli.main, evaluate_cli.main, export_cli.main):
    with pytest.raises(SystemExit) as exit_info:
      main(["--help"])
    assert exit_info.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width.
    for flag, text in (("--workdir WORKDIR", "the training run's directory"),
                       ("--average_last AVERAGE_LAST", "average the last N checkpoints (the paper: 5 "
                        "for base, 20 for big)"),
                       ("--step STEP", "use this checkpoint instead of the last")):
      assert f"{flag} {text}" in usage, (main.__module__, flag)
