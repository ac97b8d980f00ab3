"""What the commands share: the flags that choose a run's checkpoints, and reading text input."""

from __future__ import annotations

import argparse
import os
import sys

from transformer_jax.errors import MissingFileError


def positive_int(value: str) -> int:
  """argparse type: an integer >= 1."""
  number = int(value)
  if number < 1:
    raise argparse.ArgumentTypeError(f"{value} is not a positive integer (1 means the last alone)")
  return number


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
  """--workdir, --average_last and --step: the run, and which of its checkpoints to use
  (`runs.load_run`'s arguments)."""
  parser.add_argument("--workdir", required=True, help="the training run's directory")
  parser.add_argument("--average_last", type=positive_int, default=1,
                      help="average the last N checkpoints (the paper: 5 for base, 20 for big)")
  parser.add_argument("--step", type=int, help="use this checkpoint instead of the last")


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
  """--beam_size and --alpha, overriding the run's `decode` settings."""
  parser.add_argument("--beam_size", type=positive_int, help="default: the run's decode.beam_size")
  parser.add_argument("--alpha", type=float, help="length penalty; default: the run's")


def read_lines(path: str) -> list[str]:
  """The lines of a UTF-8 text file ('-': standard input), without their line breaks.

  Raises:
    DataError: naming the file, line and byte, for bytes that are not UTF-8.
    MissingFileError: if there is no such file.
  """
  name = "standard input" if path == "-" else path
  if path != "-" and not os.path.isfile(path):
    raise MissingFileError(f"{path} is not a file")
  if path == "-" and not hasattr(sys.stdin, "buffer"):  # Already text (a notebook, a test).
    return [line.rstrip("\n") for line in sys.stdin]
  stream = sys.stdin.buffer if path == "-" else open(path, "rb")
  try:
    raw = [line.rstrip(b"\n").rstrip(b"\r") for line in stream]
  finally:
    if path != "-":
      stream.close()
  from transformer_jax.data.text import decode_line  # Here: it imports tfds, slow to start.
  return [decode_line(line, name, n) for n, line in enumerate(raw, 1)]
