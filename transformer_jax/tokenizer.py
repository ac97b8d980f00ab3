"""SentencePiece tokenizers: one vocabulary shared by source and target (section 5.1).

The paper uses byte-pair encoding with a shared source-target vocabulary of about 37,000 tokens
for English-German; BPE is the default here and the unigram model an option. The special ids are
fixed (`constants.py`): PAD_ID 0, EOS_ID 1, BOS_ID 2, UNK_ID 3, so batches mean the same thing
with any trained vocabulary. The model file is saved with the run (`tokenizer.model`) and reused
when it exists.

A run fine-tuned from a Hugging Face Marian model uses that model's tokenizer instead
(`MarianVocabTokenizer`, in `marian_tokenizer/`): a SentencePiece model per side and one shared
vocabulary, its ids reordered so that ours keep their meaning (`marian_vocabulary_order`).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from transformer_jax import paths
from transformer_jax.config import TOKENIZERS
from transformer_jax.constants import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer_jax.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)



class Tokenizer:
  """Text <-> token ids, with EOS_ID appended on encoding and everything from EOS_ID on dropped
  on decoding. Picklable (it carries the serialised model), so grain workers can use it."""

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    """From a local or remote (gs://...) file."""
    return cls(paths.resolve(path).read_bytes())

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model atomically, so a run killed mid-write leaves no truncated file."""
    paths.write_bytes_atomic(path, self.model_proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def pieces(self) -> list[str]:
    """Every piece, by id."""
    return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

  def encode(self, text: str | bytes, *, target: bool = False) -> list[int]:
    """One sentence -> token ids ending with EOS_ID (either side: the vocabulary is shared)."""
    return self.encode_batch([text], target=target)[0]

  def encode_batch(self, texts: Sequence[str | bytes], *, target: bool = False) -> list[list[int]]:
    del target  # One model for both sides.
    return [ids + [EOS_ID] for ids in self._sp.encode(_strings(texts))]

  def decode(self, ids: Iterable[int]) -> str:
    """Token ids -> detokenized text; stops at the first EOS_ID and ignores padding and BOS_ID."""
    return self._sp.decode(_text_ids(ids))

  def fingerprint(self) -> bytes:
    """Bytes that change whenever the tokenization does (for cache names)."""
    return self.model_proto

  def spm_files(self) -> dict[str, bytes]:
    """The SentencePiece models as a Marian directory names them (the same model twice)."""
    return {"source.spm": self.model_proto, "target.spm": self.model_proto}

  def __getstate__(self):
    return {"model_proto": self.model_proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])


def _text_ids(ids: Iterable[int]) -> list[int]:
  """The ids of a decoder's output that stand for text: those before the first EOS_ID, less
  PAD_ID and BOS_ID."""
  kept = []
  for i in map(int, ids):
    if i == EOS_ID:
      break
    if i not in (PAD_ID, BOS_ID):
      kept.append(i)
  return kept


def _strings(texts: Sequence[str | bytes]) -> list[str]:
  return [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]


def train_tokenizer(sentences: Iterable[str | bytes], vocab_size: int, *, model_type: str = "bpe",
                    max_sentences: int = 2_000_000, seed: int = 0) -> Tokenizer:
  """Trains SentencePiece on `sentences` (source and target sides together, for a shared vocabulary).

  Args:
    sentences: training text, one sentence per item; the first `max_sentences` are used (pass
      them shuffled if the corpus is larger than that).
    vocab_size: the size of the vocabulary, special ids included.
    model_type: "bpe" (the paper) or "unigram".
    max_sentences: cap on the sentences read.
    seed: SentencePiece's random seed, for a reproducible vocabulary.
  """
  if model_type not in TOKENIZERS:
    raise ValueError(f"tokenizer model_type={model_type!r} is not one of {TOKENIZERS}")
  text = (s.decode("utf-8") if isinstance(s, bytes) else s for s in sentences)
  text = (s for s in text if s.strip())
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    _train(text, model, vocab_size, model_type, max_sentences)
  except RuntimeError as e:  # SentencePiece's own checks, e.g. a vocabulary too small or too large.
    raise ConfigError(f"SentencePiece cannot train a {vocab_size}-piece {model_type} vocabulary "
                      f"on this text (model.vocab_size): {str(e).strip().splitlines()[-1]}") from e
  return Tokenizer(model.getvalue())


def _train(text: Iterable[str], model: io.BytesIO, vocab_size: int, model_type: str,
           max_sentences: int) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=itertools.islice(text, max_sentences),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=1.0,
      pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
      pad_piece="<pad>", eos_piece="</s>", bos_piece="<s>", unk_piece="<unk>",
      # Reversible: evaluation scores detokenized output against the raw references.
      normalization_rule_name="identity",
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
  )


def load_or_train_tokenizer(path: str | os.PathLike, sentences: Iterable[str | bytes],
                            vocab_size: int, **kwargs) -> Tokenizer:
  """The tokenizer saved at `path`, or a new one trained on `sentences` and saved there.

  A saved tokenizer whose size differs from `vocab_size` is an error rather than silently reused:
  the model's embedding is sized from the config.
  """
  if paths.resolve(path).exists():
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size != vocab_size:
      raise ConfigError(
          f"the tokenizer at {path} has {tokenizer.vocab_size} pieces but model.vocab_size="
          f"{vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} or use a new workdir")
    log.info("Loaded the tokenizer from %s (%d pieces).", path, tokenizer.vocab_size)
    return tokenizer
  tokenizer = train_tokenizer(sentences, vocab_size, **kwargs)
  tokenizer.save(path)
  log.info("Trained a %d-piece tokenizer and saved it to %s.", tokenizer.vocab_size, path)
  return tokenizer


MARIAN_TOKENIZER_DIR = "marian_tokenizer"  # In a run's workdir.
MARIAN_FILES = ("source.spm", "target.spm", "vocab.json")
SPECIAL_IDS_FILE = "special_ids.json"  # Marian's vocabulary size and special ids.


def marian_vocabulary_order(vocab_size: int, *, pad: int, eos: int, decoder_start: int,
                            unk: int) -> np.ndarray:
  """Marian's id for each of ours: [PAD, EOS, BOS, UNK] from Marian's special ids, then every
  other Marian id in order.

  Marian starts decoding with its padding id, so when `decoder_start == pad` both our PAD_ID and
  BOS_ID come from that one id (its embedding row serves both), and our vocabulary is one larger.
  """
  special = [pad, eos, decoder_start, unk]
  for name, i in zip(("pad", "eos", "decoder_start", "unk"), special):
    if not 0 <= i < vocab_size:
      raise ConfigError(f"Marian's {name} id {i} is outside its vocabulary of {vocab_size}")
  if len({pad, eos, unk}) < 3 or decoder_start in (eos, unk):
    raise ConfigError(f"Marian's special ids must differ: pad={pad}, eos={eos}, unk={unk}, "
                      f"decoder_start={decoder_start}")
  rest = np.setdiff1d(np.arange(vocab_size), special)
  return np.concatenate([special, rest]).astype(np.int64)


class MarianVocabTokenizer:
  """A Marian model's tokenizer (as `transformers.MarianTokenizer` tokenizes) in our ids.

  Sources are split by `source.spm`, targets by `target.spm`, and both sides' pieces looked up in
  the shared `vocab.json` (a piece it lacks is <unk>; a leading language code such as ">>fra<<" is
  one token), then mapped to our ids by `marian_vocabulary_order`. Decoding maps back and joins
  the pieces with `target.spm`.
  """

  def __init__(self, source_proto: bytes, target_proto: bytes, vocab: dict[str, int], special: dict):
    self._files = {"source.spm": source_proto, "target.spm": target_proto}
    self._vocab, self._special = dict(vocab), dict(special)
    self._source = spm.SentencePieceProcessor(model_proto=source_proto)
    self._target = spm.SentencePieceProcessor(model_proto=target_proto)
    self.order = marian_vocabulary_order(
        special["vocab_size"], pad=special["pad_token_id"], eos=special["eos_token_id"],
        decoder_start=special["decoder_start_token_id"], unk=special["unk_token_id"])
    self._ours = np.empty(special["vocab_size"], np.int64)  # Marian id -> ours.
    self._ours[self.order] = np.arange(len(self.order))
    self._ours[self.order[PAD_ID]] = PAD_ID  # Where BOS_ID shares it.
    self._pieces = {i: piece for piece, i in self._vocab.items()}
    self._unk = special["unk_token_id"]

  @classmethod
  def load(cls, directory: str | os.PathLike) -> MarianVocabTokenizer:
    """From a Marian model directory (its tokenizer files and config.json) or from a run's copy
    (`marian_tokenizer/`, where special_ids.json stands in for the config)."""
    directory = paths.resolve(directory)
    missing = [n for n in MARIAN_FILES if not (directory / n).is_file()]
    if missing:
      raise MissingFileError(f"{directory} has no {', '.join(missing)}: a Marian model directory "
                             f"holds {', '.join(MARIAN_FILES)} beside its weights")
    vocab = _read_json(directory / "vocab.json")
    special_path = directory / SPECIAL_IDS_FILE
    if special_path.exists():
      special = _read_json(special_path)
    else:
      config = _read_json(directory / "config.json")
      tokenizer_config_path = directory / "tokenizer_config.json"
      unk = (_read_json(tokenizer_config_path).get("unk_token", "<unk>")
             if tokenizer_config_path.exists() else "<unk>")
      if isinstance(unk, dict):  # An AddedToken as transformers saves it.
        unk = unk.get("content", "<unk>")
      if unk not in vocab:
        raise ConfigError(f"{directory}/vocab.json has no unknown piece {unk!r}")
      special = {"vocab_size": config["vocab_size"], "pad_token_id": config["pad_token_id"],
                 "eos_token_id": config["eos_token_id"], "unk_token_id": vocab[unk],
                 "decoder_start_token_id": config.get("decoder_start_token_id", config["pad_token_id"])}
    return cls((directory / "source.spm").read_bytes(), (directory / "target.spm").read_bytes(),
               vocab, special)

  def save(self, directory: str | os.PathLike) -> None:
    """Writes the run's copy (local or remote), SPECIAL_IDS_FILE last: a directory without it is
    incomplete."""
    directory = paths.resolve(directory)
    for name, data in self._files.items():
      paths.write_bytes_atomic(directory / name, data)
    for name, value in (("vocab.json", self._vocab), (SPECIAL_IDS_FILE, self._special)):
      paths.write_text_atomic(directory / name, json.dumps(value, ensure_ascii=False))

  @property
  def vocab_size(self) -> int:
    return len(self.order)

  def pieces(self) -> list[str]:
    """Every piece, by our id; BOS_ID is "<s>" where it shares Marian's padding id."""
    pieces = [self._piece(int(m)) for m in self.order]
    if self.order[BOS_ID] == self.order[PAD_ID]:
      pieces[BOS_ID] = "<s>" if "<s>" not in self._vocab else "<decoder_start>"
    return pieces

  def encode(self, text: str | bytes, *, target: bool = False) -> list[int]:
    return self.encode_batch([text], target=target)[0]

  def encode_batch(self, texts: Sequence[str | bytes], *, target: bool = False) -> list[list[int]]:
    """Sentences -> our ids, EOS_ID appended: sources by source.spm, targets by target.spm."""
    model = self._target if target else self._source
    out = []
    for text in _strings(texts):
      code = []
      if text.startswith(">>") and (end := text.find("<<")) != -1:  # As MarianTokenizer does.
        code, text = [text[:end + 2]], text[end + 2:]
      pieces = code + model.encode(text, out_type=str)
      out.append([int(self._ours[self._vocab.get(p, self._unk)]) for p in pieces] + [EOS_ID])
    return out

  def decode(self, ids: Iterable[int]) -> str:
    """Our ids -> text by target.spm; stops at EOS_ID and ignores PAD_ID and BOS_ID."""
    return self._target.decode_pieces([self._piece(int(self.order[i])) for i in _text_ids(ids)])

  def _piece(self, marian_id: int) -> str:
    if marian_id in self._pieces:
      return self._pieces[marian_id]
    if marian_id < self._target.get_piece_size():  # MarianTokenizer's fallback.
      return self._target.id_to_piece(marian_id)
    return self._pieces[self._unk]

  def fingerprint(self) -> bytes:
    return b"".join([self._files["source.spm"], self._files["target.spm"],
                     json.dumps([self._vocab, self._special], sort_keys=True).encode()])

  def spm_files(self) -> dict[str, bytes]:
    return dict(self._files)

  def __getstate__(self):
    return {"files": self._files, "vocab": self._vocab, "special": self._special}

  def __setstate__(self, state):
    self.__init__(state["files"]["source.spm"], state["files"]["target.spm"], state["vocab"],
                  state["special"])


def load_run_tokenizer(workdir: str | os.PathLike) -> Tokenizer | MarianVocabTokenizer | None:
  """A run's tokenizer: `tokenizer.model`, or the Marian model's it was fine-tuned from; None
  when the workdir has neither."""
  workdir = paths.resolve(workdir)
  if (workdir / "tokenizer.model").exists():
    return Tokenizer.load(workdir / "tokenizer.model")
  if (workdir / MARIAN_TOKENIZER_DIR).is_dir():
    return MarianVocabTokenizer.load(workdir / MARIAN_TOKENIZER_DIR)
  return None


def _read_json(path: str | os.PathLike) -> dict:
  try:
    return json.loads(paths.resolve(path).read_text(encoding="utf-8"))
  except FileNotFoundError as e:
    raise MissingFileError(f"{path} does not exist") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from e
