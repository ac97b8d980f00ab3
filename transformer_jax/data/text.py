"""A user's own parallel text, as a tfds dataset in array_record format.

Each split comes from one of:
  * a tab-separated file, "source<TAB>target" on every line;
  * two line-aligned files, written "SOURCE_FILE,TARGET_FILE" (line i of one translates line i
    of the other).
The config fields are `data.text_train`, `data.text_validation` and `data.text_test`.

Every line must hold exactly two non-empty sides in valid UTF-8 (surrounding whitespace is
stripped, a trailing "\r" too, and a UTF-8 byte-order mark at the start of a file). A line that
does not raises `BadLineError`, naming the file and the 1-based line number: a wrong number of
columns, two files of different lengths, invalid UTF-8, a NUL byte (binary or UTF-16 data), an
empty side. A file that starts with a UTF-16 byte-order mark (what spreadsheets save as "Unicode
Text") is refused whole with a message to save it as UTF-8, and so is a split with no usable line. With `skip_bad_lines=True` such lines are skipped instead and counted by
reason; the counts are logged and stored in `builder.info.metadata["skipped_lines"]`.

Each split is its own tfds config, named "<source>-<target>-<split>-<fingerprint>". The
fingerprint hashes the files' absolute paths, sizes and modification times with the options, so
editing, replacing or touching a file gives a new config that is prepared afresh, while an
unchanged file is never read twice; changing one split's files leaves the others prepared.
Datasets of older fingerprints stay on disk until deleted.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds

from transformer_jax.constants import SPLITS
from transformer_jax.errors import ConfigError, DataError, MissingFileError

log = logging.getLogger(__name__)

# Codes become feature names, so they are kept to simple identifiers ("en", "de", "pt_br").
_LANG_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
SKIP_REASONS = ("columns", "unpaired", "utf8", "nul", "empty")
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class BadLineError(DataError):
  """A malformed input line; the message names the file and its 1-based line number.

  Attributes:
    reason: one of SKIP_REASONS, the key under which a skipped line is counted.
  """

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


def parse_spec(spec: str) -> tuple[str, ...]:
  """The files of one split: ("file.tsv",) or ("source_file", "target_file").

  Args:
    spec: a path, or two paths joined by a comma (paths containing commas are not supported).

  Returns:
    One or two paths, made absolute.
  """
  parts = tuple(p.strip() for p in spec.split(","))
  if not spec.strip() or len(parts) > 2 or not all(parts):
    raise ConfigError(
        f"{spec!r} is not a tab-separated file or 'SOURCE_FILE,TARGET_FILE'")
  for path in parts:
    if not os.path.isfile(path):
      raise MissingFileError(f"{path} (from {spec!r}) is not a file")
  return tuple(os.path.abspath(p) for p in parts)


def fingerprint(files: Sequence[str], **options: Any) -> str:
  """A short hash of the files' paths, sizes and modification times, and of `options`.

  Args:
    files: the input paths.
    **options: anything else that changes the prepared data (split, languages, ...).

  Returns:
    12 hex digits.
  """
  stats = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
  blob = json.dumps({"files": stats, **options}, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:12]


def _lines(path: str) -> Iterator[bytes]:
  with open(path, "rb") as f:
    if f.read(2) in _UTF16_BOMS:
      raise DataError(
          f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark), as spreadsheets save "
          "'Unicode Text'; save it as UTF-8 (for example 'CSV UTF-8' or 'Tab-delimited UTF-8') "
          "and run again")
    f.seek(0)
    for line in f:
      yield line.rstrip(b"\n").rstrip(b"\r")


def decode_line(raw: bytes, path: str, line_number: int) -> str:
  """One line's bytes as text; BadLineError naming the file, line and byte if it is not UTF-8."""
  try:
    # "utf-8-sig" drops the byte-order mark some editors write at the start of a file.
    return raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
  except UnicodeDecodeError as e:
    raise BadLineError(
        f"{path}, line {line_number}: invalid UTF-8 at byte {e.start} of the line "
        f"({raw[e.start:e.start + 4]!r})", "utf8") from None


def read_pairs(files: Sequence[str], *, skip_bad_lines: bool = False,
               skipped: collections.Counter | None = None) -> Iterator[tuple[int, str, str]]:
  """The sentence pairs of one split, checked line by line, streamed.

  Args:
    files: (tsv_file,) or (source_file, target_file).
    skip_bad_lines: skip malformed lines instead of raising BadLineError.
    skipped: a Counter that receives the skipped lines by reason (SKIP_REASONS).

  Returns:
    An iterator of (line_number, source, target), line numbers from 1.
  """
  skipped = skipped if skipped is not None else collections.Counter()
  if len(files) == 1:
    rows = ((n, [(files[0], raw)]) for n, raw in enumerate(_lines(files[0]), 1))
  elif len(files) == 2:
    rows = ((n, [(path, raw) for path, raw in zip(files, pair)])
            for n, pair in enumerate(itertools.zip_longest(*map(_lines, files)), 1))
  else:
    raise ValueError(f"expected one tab-separated file or two aligned files, got {files}")

  for line_number, row in rows:
    try:
      sides = _check_row(files, line_number, row)
    except BadLineError as e:
      if not skip_bad_lines:
        raise
      skipped[e.reason] += 1
      continue
    yield line_number, sides[0], sides[1]


def _check_row(files: Sequence[str], n: int, row: list[tuple[str, bytes | None]]) -> list[str]:
  """The two stripped sides of one line; raises BadLineError if it is malformed."""
  if len(files) == 2 and any(raw is None for _, raw in row):
    short = next(path for path, raw in row if raw is None)
    longer = next(path for path, raw in row if raw is not None)
    raise BadLineError(
        f"{longer}, line {n}: no matching line in {short}, which has only {n - 1} lines "
        "(the two files must have the same number of lines)", "unpaired")
  texts = [(path, decode_line(raw, path, n)) for path, raw in row]
  for path, text in texts:
    if "\x00" in text:
      raise BadLineError(
          f"{path}, line {n}: a NUL byte at character {text.index(chr(0)) + 1}; the file holds "
          "binary or UTF-16 data, not UTF-8 text", "nul")
  if len(files) == 1:
    path, text = texts[0]
    columns = text.split("\t")
    if len(columns) != 2:
      raise BadLineError(
          f"{path}, line {n}: expected 2 tab-separated columns (source, target), found "
          f"{len(columns)}", "columns")
    texts = [(path, c) for c in columns]
  sides = [text.strip() for _, text in texts]
  for name, (path, _), side in zip(("source", "target"), texts, sides):
    if not side:
      raise BadLineError(f"{path}, line {n}: the {name} side is empty", "empty")
  return sides


@dataclasses.dataclass(eq=False)
class TextConfig(tfds.core.BuilderConfig):
  """One split of the user's text: its files, the language codes of the two sides, the mode."""

  split: str = "train"
  files: tuple[str, ...] = ()
  source_lang: str = ""
  target_lang: str = ""
  skip_bad_lines: bool = False


class ParallelText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A user's parallel text; build it with `make_builder`, one config per split."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "One config per split, named by a fingerprint of the inputs.",
                   "1.1.0": "Lines with NUL bytes are bad lines; UTF-16 files are refused."}

  # Nothing is downloaded through tfds, so there are no checksums. Overriding this also keeps
  # tfds from looking up the module's path, which needs `importlib_resources` on this setup.
  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> None:
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Parallel text from {', '.join(config.files)}.",
        features=tfds.features.Translation(languages=(config.source_lang, config.target_lang)),
        supervised_keys=(config.source_lang, config.target_lang),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The files are local.
    return {self.builder_config.split: self._generate_examples()}

  def _generate_examples(self):
    config = self.builder_config
    skipped = collections.Counter()
    yielded = 0
    for n, source, target in read_pairs(config.files, skip_bad_lines=config.skip_bad_lines,
                                        skipped=skipped):
      yielded += 1
      yield n, {config.source_lang: source, config.target_lang: target}
    counts = {reason: skipped[reason] for reason in SKIP_REASONS}
    counts["total"] = sum(skipped.values())
    if not yielded:
      what = (f"all {counts['total']} lines were skipped as bad ({counts})" if counts["total"]
              else "it is empty")
      raise DataError(f"{', '.join(config.files)} ({config.split} split): no sentence pairs, {what}")
    if counts["total"]:
      log.warning("%s: skipped %d bad lines (%s).", ", ".join(config.files), counts["total"],
                      counts)
    # Runs before tfds writes the dataset info, so the counts are saved with the data.
    self.info.metadata["skipped_lines"] = counts
    self.info.metadata["files"] = list(config.files)


def make_config(split: str, spec: str, source_lang: str, target_lang: str,
                skip_bad_lines: bool = False) -> TextConfig:
  """The config of one split, named after a fingerprint of its inputs.

  Args:
    split: "train", "validation" or "test".
    spec: the value of `data.text_<split>`: "file.tsv" or "SOURCE_FILE,TARGET_FILE".
    source_lang: the code under which the source side is stored.
    target_lang: the code under which the target side is stored.
    skip_bad_lines: skip and count malformed lines instead of failing.

  Returns:
    A TextConfig.
  """
  if split not in SPLITS:
    raise ConfigError(f"split={split!r} is not one of {', '.join(map(repr, SPLITS))}")
  for field, code in (("source_lang", source_lang), ("target_lang", target_lang)):
    if not _LANG_CODE.match(code or ""):
      raise ConfigError(f"{field}={code!r} must be a language code such as 'en' (letters, digits, "
                       "underscores)")
  if source_lang == target_lang:
    raise ConfigError(f"source_lang and target_lang are both {source_lang!r}; they must differ")
  if not spec:
    raise ConfigError(f"data.text_{split} is empty; set it to a tab-separated file or "
                     "'SOURCE_FILE,TARGET_FILE'")
  files = parse_spec(spec)
  digest = fingerprint(files, split=split, langs=[source_lang, target_lang],
                       skip_bad_lines=skip_bad_lines, version=str(ParallelText.VERSION))
  return TextConfig(
      name=f"{source_lang}-{target_lang}-{split}-{digest}", split=split, files=files,
      source_lang=source_lang, target_lang=target_lang, skip_bad_lines=skip_bad_lines,
      description=f"{split}: {spec}")


def make_builder(split: str, spec: str, source_lang: str, target_lang: str, *,
                 skip_bad_lines: bool = False, data_dir: str | None = None) -> ParallelText:
  """The array_record builder of one split (not prepared yet if its inputs are new).

  Args:
    split: see `make_config`.
    spec: see `make_config`.
    source_lang: see `make_config`.
    target_lang: see `make_config`.
    skip_bad_lines: see `make_config`.
    data_dir: tfds data_dir; None means tfds' default.

  Returns:
    The builder; call `download_and_prepare()` then `as_data_source(split)`.
  """
  config = make_config(split, spec, source_lang, target_lang, skip_bad_lines)
  return ParallelText(config=config, data_dir=data_dir, file_format="array_record")


def skipped_counts(builder: ParallelText) -> dict[str, int]:
  """The lines skipped when a prepared split was built, by reason (all zero in strict mode)."""
  return dict(builder.info.metadata.get("skipped_lines", {}))
