"""`transformer-export`: a trained run as a Hugging Face MarianMTModel directory.

  transformer-export --workdir runs/quickstart --output_dir exported --average_last 5

Needs the [hf] extra (`pip install -e ".[hf]"`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformer_jax.cli.common import add_run_arguments
from transformer_jax.errors import run_command


def main(argv: Sequence[str] | None = None) -> int:
  """`transformer-export`: a trained run as a Hugging Face MarianMTModel directory."""
  parser = argparse.ArgumentParser(prog="transformer-export", description=main.__doc__)
  add_run_arguments(parser)
  parser.add_argument("--output_dir", required=True, help="where to write the Marian model")
  args = parser.parse_args(argv)

  def body() -> None:
    from transformer_jax import export  # Here, not above: --help answers without importing JAX.

    export.export(args.workdir, args.output_dir, average_last=args.average_last, step=args.step)
    print(f"wrote {args.output_dir}: load it with transformers.MarianMTModel.from_pretrained and "
          "MarianTokenizer.from_pretrained")

  return run_command(parser.prog, body)


def main_entry() -> None:
  sys.exit(main())
