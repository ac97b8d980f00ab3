"""A trained run written as a Hugging Face MarianMTModel directory, to serve with `transformers`,
or as a CTranslate2 model directory, to serve with CTranslate2.

The weight and config mappings are `marian`'s and `ctranslate2_export`'s (pure: they know nothing
of runs); this module loads the run (`runs.load_run`), maps it, and writes what
`MarianMTModel.from_pretrained` and `MarianTokenizer.from_pretrained` read (the [hf] extra,
`pip install -e ".[hf]"`), or what `ctranslate2.Translator` reads (the [ct2] extra).
"""

from __future__ import annotations

import json
import logging
import os

from transformer_jax import ctranslate2_export, marian, runs
from transformer_jax.constants import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer_jax.marian import MARIAN_LAYER_NORM_EPSILON

log = logging.getLogger(__name__)


def export(workdir: str, output_dir: str, *, average_last: int = 1, step: int | None = None) -> str:
  """Writes a trained run as a directory that `MarianMTModel.from_pretrained` and
  `MarianTokenizer.from_pretrained` load: safetensors weights, config, generation config (the
  run's beam size; no length penalty, since Marian's divides by |Y|^alpha where ours is GNMT's;
  PAD_ID and BOS_ID never generated, as in `decode.never_generated`), and the tokenizer as Marian
  lays it out (our one SentencePiece model as both `source.spm` and `target.spm`, or the Marian
  model's two for a run fine-tuned from one, and a `vocab.json` that maps each piece to our id).

  Args:
    workdir: the run's directory.
    output_dir: where to write (created).
    average_last: which checkpoints, as for `runs.load_run`.
    step: which checkpoint, as for `runs.load_run`.

  Returns:
    `output_dir`.
  """
  import transformers  # The [hf] extra.

  run = runs.load_run(workdir, average_last=average_last, step=step)
  cfg = run.setup.model_config
  if cfg.layer_norm_epsilon != MARIAN_LAYER_NORM_EPSILON:
    log.warning(
        "model.layer_norm_epsilon=%g, Marian's is fixed at %g: logits will differ by about 1e-5.",
        cfg.layer_norm_epsilon, MARIAN_LAYER_NORM_EPSILON)
  max_length = _max_length(run)
  model = marian.marian_model(run.params, cfg, max_positions=max(1024, max_length))
  model.generation_config = transformers.GenerationConfig(
      decoder_start_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
      num_beams=int(run.config.decode.beam_size), length_penalty=0.0, early_stopping=False,
      max_length=max_length, do_sample=False, bad_words_ids=[[PAD_ID], [BOS_ID]])
  os.makedirs(output_dir, exist_ok=True)
  model.save_pretrained(output_dir)
  for name, data in run.tokenizer.spm_files().items():
    with open(os.path.join(output_dir, name), "wb") as f:
      f.write(data)
  pieces = run.tokenizer.pieces()
  vocab = {piece: i for i, piece in enumerate(pieces)}
  with open(os.path.join(output_dir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(output_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "MarianTokenizer", "source_lang": run.config.data.source_lang,
               "target_lang": run.config.data.target_lang, "separate_vocabs": False,
               "pad_token": pieces[PAD_ID], "eos_token": pieces[EOS_ID],
               "unk_token": pieces[UNK_ID], "additional_special_tokens": [pieces[BOS_ID]],
               "model_max_length": max_length}, f, indent=2)
  return output_dir


def export_ctranslate2(workdir: str, output_dir: str, *, average_last: int = 1,
                       step: int | None = None, quantization: str | None = None) -> str:
  """Writes a trained run as a CTranslate2 model directory (`ctranslate2_export.save`): its weights,
  config and vocabulary in our order, and the run's SentencePiece models beside them as
  `source.spm` and `target.spm` (one model twice, or a Marian model's two), which turn text into
  the pieces CTranslate2 translates and its output pieces back into text.

  Args:
    workdir: the run's directory.
    output_dir: where to write (created).
    average_last: which checkpoints, as for `runs.load_run`.
    step: which checkpoint, as for `runs.load_run`.
    quantization: the stored weight type (`ctranslate2_export.QUANTIZATIONS`); None: float32.

  Returns:
    `output_dir`.
  """
  run = runs.load_run(workdir, average_last=average_last, step=step)
  return ctranslate2_export.save(
      run.params, run.setup.model_config, run.tokenizer.pieces(), output_dir,
      spm_files=run.tokenizer.spm_files(), max_positions=max(1024, _max_length(run)),
      quantization=quantization)


def _max_length(run: runs.Run) -> int:
  """The longest output the run's decoding settings allow, plus its start position."""
  return int(run.config.data.max_len) + int(run.config.decode.max_extra_len) + 1
