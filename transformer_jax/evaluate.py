"""Translation quality: sacreBLEU and chrF on detokenized output against the raw references.

BLEU in the paper is tokenized BLEU on newstest2014. Here the primary number is sacreBLEU (cased,
13a tokenization, detokenized hypotheses against untokenized references) with its signature, so
that figures are comparable across papers and tools.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import sacrebleu
from jax.experimental import multihost_utils

from transformer_jax import checkpoints, paths, sharding
from transformer_jax.config import decode_tokens_per_batch
from transformer_jax.data import pipeline, token_cache
from transformer_jax.errors import CheckpointError, DataError, MissingFileError, UserError, run_command
from transformer_jax.steps import Setup, make_setup
from transformer_jax.tokenizer import MARIAN_TOKENIZER_DIR, MarianVocabTokenizer, Tokenizer, load_run_tokenizer


def score(hypotheses: Sequence[str], references: Sequence[str], target_lang: str | None = None
          ) -> dict[str, Any]:
  """Corpus BLEU (cased, 13a) and chrF of detokenized `hypotheses` against raw `references`, and,
  given the target language, the paper's tokenized BLEU (`tokenized_bleu`) as "bleu_tokenized"."""
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
  bleu = sacrebleu.metrics.BLEU(tokenize="13a", lowercase=False)
  chrf = sacrebleu.metrics.CHRF()
  bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
  chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
  scores = {
      "bleu": bleu_score.score,
      "chrf": chrf_score.score,
      "bleu_signature": str(bleu.get_signature()),
      "chrf_signature": str(chrf.get_signature()),
  }
  if target_lang:
    scores["bleu_tokenized"] = tokenized_bleu(hypotheses, references, target_lang)
  return scores


COMPOUND = re.compile(r"(\S)-(\S)")  # get_ende_bleu.sh's s{(\S)-(\S)}{$1 ##AT##-##AT## $2}g


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str], lang: str) -> float:
  """BLEU as the paper's Table 2 reports it (tensor2tensor's get_ende_bleu.sh): both sides
  Moses-tokenized (tokenizer.perl -l LANG, via sacremoses), hyphenated compounds split
  ("Hotel-Zimmer" -> "Hotel ##AT##-##AT## Zimmer"), then multi-bleu.perl's cased corpus BLEU (no
  smoothing). Not comparable with sacreBLEU: the same output reads about 1 to 1.5 higher here
  (tensor2tensor's base model: 27.5 sacreBLEU, 29.0 this way)."""
  from sacremoses import MosesTokenizer

  tokenizer = MosesTokenizer(lang=lang)

  def prepare(text: str) -> str:
    tokens = tokenizer.tokenize(text, return_str=True)
    return COMPOUND.sub(r"\1 ##AT##-##AT## \2", tokens)

  bleu = sacrebleu.metrics.BLEU(tokenize="none", smooth_method="none", force=True)
  return bleu.corpus_score([prepare(h) for h in hypotheses], [[prepare(r) for r in references]]).score


def translate_corpus(setup: Setup, params: Any, corpus: token_cache.TokenizedCorpus,
                     indices: np.ndarray, tokenizer, *, tokens_per_batch: int, max_len: int,
                     beam_size: int, alpha: float, max_extra_len: int) -> list[str]:
  """Translates the sources of `corpus[indices]`, batched by length, in the order of `indices`.

  Every process takes part (the batch is sharded over the setup's mesh); every process gets all
  the translations back. The decoding program is the setup's (`Setup.translate_fn`): compiled once
  per batch shape for the whole run, not once per call.
  """
  batches = pipeline.EpochBatches.single_pass(corpus, indices, tokens_per_batch=tokens_per_batch,
                                              max_len=max_len, **sharding.row_split(setup.mesh))
  translate = setup.translate_fn(beam_size, alpha, max_extra_len)
  mesh = setup.mesh
  plan = batches.plan(0)
  output: dict[int, str] = {}
  for k in range(len(plan)):
    src = sharding.global_batch({"src": batches[k]["src"]}, mesh)["src"]
    tokens = translate(params, src)
    tokens = (np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
              if jax.process_count() > 1 else np.asarray(jax.device_get(tokens)))
    for row, (i,) in enumerate(plan.batch_rows(k)):
      output[i] = tokenizer.decode(tokens[row])
  return [output[int(i)] for i in indices]


# ----------------------------------------------------------------------------- a trained run


class RunError(UserError, ValueError):
  """A workdir that cannot be used for translation: missing, empty or inconsistent."""


@dataclasses.dataclass
class Run:
  """A trained run ready to translate: its config, model, mesh, parameters and tokenizer."""

  config: ml_collections.ConfigDict
  setup: Setup
  params: Any
  tokenizer: Tokenizer | MarianVocabTokenizer
  steps: list[int]  # The checkpoints the parameters come from (several when averaged).

  def translate(self, sentences: Sequence[str], *, beam_size: int | None = None,
                alpha: float | None = None, max_extra_len: int | None = None) -> list[str]:
    """Detokenized translations of `sentences`, in order (batched by length, as in training)."""
    decode_cfg = self.config.decode
    ids = [self.tokenizer.encode(s) for s in sentences]
    lengths = np.asarray([len(x) for x in ids])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((t for x in ids for t in x), np.int32, int(lengths.sum()))
    corpus = token_cache.TokenizedCorpus(flat, offsets, flat, offsets)  # Targets unused.
    max_len = max(int(lengths.max(initial=1)), int(self.config.data.max_len))
    return translate_corpus(
        self.setup, self.params, corpus, np.arange(len(sentences)),
        self.tokenizer, tokens_per_batch=decode_tokens_per_batch(self.config),
        max_len=max_len,
        beam_size=decode_cfg.beam_size if beam_size is None else beam_size,
        alpha=decode_cfg.length_penalty if alpha is None else alpha,
        max_extra_len=decode_cfg.max_extra_len if max_extra_len is None else max_extra_len)


def load_run(workdir: str, *, average_last: int = 1, step: int | None = None) -> Run:
  """Loads a run's tokenizer and checkpoint (or the average of its last `average_last`) onto the
  local devices, with the config saved in the checkpoint.

  Raises:
    RunError: if the workdir does not exist, has no checkpoint or tokenizer, or they disagree.
    CheckpointError: naming the checkpoint, if one that is needed does not restore.
  """
  if isinstance(average_last, bool) or not isinstance(average_last, int) or average_last < 1:
    raise RunError(f"average_last={average_last!r}: average at least 1 checkpoint (1: the last alone)")
  workdir = paths.resolve(workdir)
  if not workdir.is_dir():
    raise RunError(f"workdir {workdir} does not exist; train a model first "
                   f"(python train.py --workdir {workdir})")
  steps = checkpoints.saved_steps(workdir)
  tokenizer = load_run_tokenizer(workdir)
  if not steps or tokenizer is None:
    missing = "checkpoints" if not steps else f"tokenizer.model (nor {MARIAN_TOKENIZER_DIR}/)"
    raise RunError(f"workdir {workdir} has no {missing}; is it a training run's workdir?")
  if step is not None and step not in steps:
    raise RunError(f"workdir {workdir} has no checkpoint at step {step}; it has {steps}")
  used = [step] if step is not None else steps[-average_last:]
  manager = checkpoints.make_manager(workdir, ml_collections.ConfigDict(
      {"checkpoints_to_keep": len(steps), "checkpoints_to_average": 1}))
  try:
    config = _explain(checkpoints.restore_config, steps)(manager, used[-1])
    for axis, size in (("data", -1), ("fsdp", 1), ("tensor", 1)):
      config.mesh[axis] = size  # Translate on whatever devices are here.
    if tokenizer.vocab_size != config.model.vocab_size:
      raise RunError(f"the tokenizer in {workdir} has {tokenizer.vocab_size} pieces but the "
                     f"checkpoint's model has vocab_size={config.model.vocab_size}")
    setup = make_setup(config)
    params = _explain(checkpoints.average, steps)(manager, setup, steps=used)
  finally:
    manager.close()
  return Run(config, setup, params, tokenizer, used)


def _explain(restore, steps: list[int]):
  """`restore`, whose CheckpointError also lists the run's checkpoints and how to pick another."""
  def wrapped(*args, **kwargs):
    try:
      return restore(*args, **kwargs)
    except CheckpointError as e:
      raise CheckpointError(f"{e}. The run has checkpoints {steps}: pass --step with another one "
                            "(and --average_last 1), or move the damaged one away") from e
  return wrapped


# ----------------------------------------------------------------------------- the commands


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


def _check_arguments(sentences: Sequence[str]) -> list[str]:
  """Command-line sentences, refused (naming which) if they held bytes that are not UTF-8."""
  for n, sentence in enumerate(sentences, 1):
    try:
      sentence.encode("utf-8")
    except UnicodeEncodeError as e:
      raise DataError(f"sentence argument {n}: invalid UTF-8 at character {e.start + 1}") from None
  return list(sentences)


def positive_int(value: str) -> int:
  """argparse type: an integer >= 1."""
  number = int(value)
  if number < 1:
    raise argparse.ArgumentTypeError(f"{value} is not a positive integer (1 means the last alone)")
  return number


def _common_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", required=True, help="the training run's directory")
  parser.add_argument("--average_last", type=positive_int, default=1,
                      help="average the last N checkpoints (the paper: 5 for base, 20 for big)")
  parser.add_argument("--step", type=int, help="use this checkpoint instead of the last")
  parser.add_argument("--beam_size", type=positive_int, help="default: the run's decode.beam_size")
  parser.add_argument("--alpha", type=float, help="length penalty; default: the run's")


def evaluate_main(argv: Sequence[str] | None = None) -> int:
  """`transformer-evaluate`: translate a split or a file with a run and score it with sacreBLEU."""
  parser = argparse.ArgumentParser(prog="transformer-evaluate", description=evaluate_main.__doc__)
  _common_arguments(parser)
  parser.add_argument("--split", default="test", help="a split of the run's dataset (default: test)")
  parser.add_argument("--source_file", help="translate this file (one sentence a line) instead")
  parser.add_argument("--reference_file", help="references for --source_file, line by line")
  parser.add_argument("--output_dir", help="where to write hypotheses and scores (default: workdir)")
  args = parser.parse_args(argv)
  if args.source_file and not args.reference_file:
    parser.error("--source_file needs --reference_file")

  def body() -> int:
    run = load_run(args.workdir, average_last=args.average_last, step=args.step)
    if args.source_file:
      sources, references = read_lines(args.source_file), read_lines(args.reference_file)
      if len(sources) != len(references):
        raise RunError(f"{args.source_file} has {len(sources)} lines but {args.reference_file} "
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


def translate_main(argv: Sequence[str] | None = None) -> int:
  """`translate`: translate sentences (arguments, --input file, or standard input) with a run."""
  parser = argparse.ArgumentParser(prog="translate", description=translate_main.__doc__)
  parser.add_argument("sentences", nargs="*", help="sentences to translate")
  _common_arguments(parser)
  parser.add_argument("--input", help="a file with one sentence a line ('-' for standard input)")
  args = parser.parse_args(argv)
  if args.sentences and args.input:
    parser.error("give sentences as arguments or with --input, not both")

  def body() -> int:
    # The input is read (and checked) before the model is loaded: a bad file fails at once.
    sentences = (_check_arguments(args.sentences) if args.sentences
                 else read_lines(args.input or "-"))
    run = load_run(args.workdir, average_last=args.average_last, step=args.step)
    if sentences:
      for line in run.translate(sentences, beam_size=args.beam_size, alpha=args.alpha):
        print(line)
    return 0

  return run_command(parser.prog, body)


def translate_main_entry() -> None:
  sys.exit(translate_main())


def evaluate_main_entry() -> None:
  sys.exit(evaluate_main())
