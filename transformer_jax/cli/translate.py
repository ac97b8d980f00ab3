"""`translate`: translate sentences (arguments, --input file, or standard input) with a run.

  translate --workdir runs/quickstart "Am Anfang war das Wort."
  translate --workdir runs/quickstart --average_last 5 --input sentences.txt > translations.txt

A whole file is translated in batches of sentences of similar length (`Run.translate`), and the
translations are written to standard output in the input's order. Standard error gets a progress
bar (on a terminal) and, at the end, the throughput: sentences and output tokens per second,
compilation included (the first batch of each length compiles its decoder).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from tqdm import tqdm

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
    if not sentences:
      return 0
    generated: list[int] = []  # Output tokens of each batch.
    start = time.perf_counter()
    # disable=None: a bar on a terminal only, so that a redirected stderr gets no control codes.
    with tqdm(total=len(sentences), unit="sentence", file=sys.stderr, disable=None) as bar:
      lines = run.translate(sentences, beam_size=args.beam_size, alpha=args.alpha,
                            progress=lambda done, tokens: (bar.update(done), generated.append(tokens)))
    seconds, tokens = time.perf_counter() - start, sum(generated)
    for line in lines:
      print(line)
    print(f"translated {len(lines)} sentences ({tokens} output tokens) in {seconds:.1f} s: "
          f"{len(lines) / seconds:.1f} sentences/s, {tokens / seconds:.0f} tokens/s "
          "(compilation included)", file=sys.stderr)
    return 0

  return run_command(parser.prog, body)


def main_entry() -> None:
  sys.exit(main())
