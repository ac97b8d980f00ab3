"""`transformer-evaluate`: translate a split or a file with a run and score it with sacreBLEU.

  transformer-evaluate --workdir runs/quickstart --average_last 5          # the test split
  transformer-evaluate --workdir runs/quickstart --source_file src.txt --reference_file ref.txt

Writes NAME.hypotheses.txt and NAME.scores.json (sacreBLEU and chrF with their signatures, the
paper's tokenized BLEU, the checkpoints used) to --output_dir, by default the workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from transformer_jax import paths, runs
from transformer_jax.cli.common import add_decode_arguments, add_run_arguments, read_lines
from transformer_jax.errors import run_command
from transformer_jax.evaluate import score


def main(argv: Sequence[str] | None = None) -> int:
  """`transformer-evaluate`: translate a split or a file with a run and score it with sacreBLEU."""
  parser = argparse.ArgumentParser(prog="transformer-evaluate", description=main.__doc__)
  add_run_arguments(parser)
  add_decode_arguments(parser)
  parser.add_argument("--split", default="test", help="a split of the run's dataset (default: test)")
  parser.add_argument("--source_file", help="translate this file (one sentence a line) instead")
  parser.add_argument("--reference_file", help="references for --source_file, line by line")
  parser.add_argument("--output_dir", help="where to write hypotheses and scores (default: workdir)")
  args = parser.parse_args(argv)
  if args.source_file and not args.reference_file:
    parser.error("--source_file needs --reference_file")

  def body() -> int:
    run = runs.load_run(args.workdir, average_last=args.average_last, step=args.step)
    if args.source_file:
      sources, references = read_lines(args.source_file), read_lines(args.reference_file)
      if len(sources) != len(references):
        raise runs.RunError(f"{args.source_file} has {len(sources)} lines but {args.reference_file} "
                            f"has {len(references)}")
      name = os.path.basename(args.source_file)
    else:
      from transformer_jax.data import sources as data_sources
      split = data_sources.load_split(run.config.data, args.split)
      sources = [split.examples[i][split.source_lang].decode() for i in range(len(split.examples))]
      references = [split.examples[i][split.target_lang].decode() for i in range(len(split.examples))]
      name = args.split
    hypotheses = run.translate(sources, beam_size=args.beam_size, alpha=args.alpha)
    scores = score(hypotheses, references, run.config.data.target_lang)
    scores.update(sentences=len(sources), checkpoints=run.steps,
                  beam_size=args.beam_size or run.config.decode.beam_size)
    output_dir = paths.resolve(args.output_dir or args.workdir)
    paths.write_text_atomic(output_dir / f"{name}.hypotheses.txt", "".join(h + "\n" for h in hypotheses))
    paths.write_text_atomic(output_dir / f"{name}.scores.json", json.dumps(scores, indent=2))
    print(f"{name}: sacreBLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}  tokenized BLEU "
          f"{scores['bleu_tokenized']:.2f} (the paper's recipe: Moses tokens, compounds split; not "
          f"comparable with sacreBLEU)  ({len(sources)} sentences, checkpoints {run.steps})\n"
          f"{scores['bleu_signature']}\n"
          f"{scores['chrf_signature']}\nwritten to {output_dir}")
    return 0

  return run_command(parser.prog, body)


def main_entry() -> None:
  sys.exit(main())
