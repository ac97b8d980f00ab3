"""`translate`: translate sentences (arguments, --input file, or standard input) with a run.

  translate --workdir runs/quickstart "Am Anfang war das Wort."
  translate --workdir runs/quickstart --average_last 5 --input sentences.txt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformer_jax import runs
from transformer_jax.cli.common import add_decode_arguments, add_run_arguments, read_lines
from transformer_jax.errors import DataError, run_command


def check_arguments(sentences: Sequence[str]) -> list[str]:
  """Command-line sentences, refused (naming which) if they held bytes that are not UTF-8 (Python
  keeps such bytes as surrogates, which would fail later, far from their cause)."""
  for n, sentence in enumerate(sentences, 1):
    try:
      sentence.encode("utf-8")
    except UnicodeEncodeError as e:
      raise DataError(f"sentence argument {n}: invalid UTF-8 at character {e.start + 1}") from None
  return list(sentences)


def main(argv: Sequence[str] | None = None) -> int:
  """`translate`: translate sentences (arguments, --input file, or standard input) with a run."""
  parser = argparse.ArgumentParser(prog="translate", description=main.__doc__)
  parser.add_argument("sentences", nargs="*", help="sentences to translate")
  add_run_arguments(parser)
  add_decode_arguments(parser)
  parser.add_argument("--input", help="a file with one sentence a line ('-' for standard input)")
  args = parser.parse_args(argv)
  if args.sentences and args.input:
    parser.error("give sentences as arguments or with --input, not both")

  def body() -> int:
    # The input is read (and checked) before the model is loaded: a bad file fails at once.
    sentences = (check_arguments(args.sentences) if args.sentences
                 else read_lines(args.input or "-"))
    run = runs.load_run(args.workdir, average_last=args.average_last, step=args.step)
    if sentences:
      for line in run.translate(sentences, beam_size=args.beam_size, alpha=args.alpha):
        print(line)
    return 0

  return run_command(parser.prog, body)


def main_entry() -> None:
  sys.exit(main())
