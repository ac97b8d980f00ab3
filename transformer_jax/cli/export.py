"""`transformer-export`: a trained run as a Hugging Face MarianMTModel directory, or as a
CTranslate2 model directory.

  transformer-export --workdir runs/quickstart --output_dir exported --average_last 5
  transformer-export --workdir runs/quickstart --output_dir ct2 --format ctranslate2

Needs the [hf] extra (`pip install -e ".[hf]"`), or the [ct2] extra for --format ctranslate2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformer_jax.cli.common import add_run_arguments
from transformer_jax.errors import ConfigError, run_command

FORMATS = ("huggingface", "ctranslate2")


def main(argv: Sequence[str] | None = None) -> int:
  """`transformer-export`: a trained run as a Hugging Face MarianMTModel or CTranslate2 directory."""
  parser = argparse.ArgumentParser(prog="transformer-export", description=main.__doc__)
  add_run_arguments(parser)
  parser.add_argument("--output_dir", required=True, help="where to write the model")
  parser.add_argument("--format", choices=FORMATS, default="huggingface",
                      help="huggingface: a MarianMTModel directory (transformers); ctranslate2: a "
                      "CTranslate2 model directory with the run's SentencePiece models")
  parser.add_argument("--quantization", help="--format ctranslate2 only: the stored weight type "
                      "(int8, int16, float16, bfloat16, ...); default float32, any of them can "
                      "also be chosen when loading (compute_type)")
  args = parser.parse_args(argv)

  def body() -> None:
    from transformer_jax import export  # Here, not above: --help answers without importing JAX.

    if args.format == "ctranslate2":
      export.export_ctranslate2(args.workdir, args.output_dir, average_last=args.average_last,
                                step=args.step, quantization=args.quantization)
      print(f"wrote {args.output_dir}: load it with ctranslate2.Translator; source.spm and "
            "target.spm there turn text into its pieces and back")
      return
    if args.quantization:
      raise ConfigError("--quantization is for --format ctranslate2")
    export.export(args.workdir, args.output_dir, average_last=args.average_last, step=args.step)
    print(f"wrote {args.output_dir}: load it with transformers.MarianMTModel.from_pretrained and "
          "MarianTokenizer.from_pretrained")

  return run_command(parser.prog, body)


def main_entry() -> None:
  sys.exit(main())
