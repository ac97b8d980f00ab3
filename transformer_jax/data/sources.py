"""One entry point to the parallel corpora: `load_split(config.data, split)`.

Every corpus is a tfds dataset written in array_record format and read with random access
(`builder.as_data_source`), so the input pipeline can index examples directly. The corpus is
chosen by `data.dataset`:
  "bible"  the offline default, verse-aligned Bibles (`bible.py`): en-de, en-fr;
  "wmt14"  WMT 2014 as in the paper (`wmt.py`): en-de, en-fr, downloaded or from `data.manual_dir`;
  "text"   the user's files (`text.py`), `data.text_<split>`.
Each is prepared on first use under `data.data_dir` (tfds' default when None) and reused after.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

import ml_collections
import tensorflow_datasets as tfds

from transformer_jax.config import DATASETS, check_choice
from transformer_jax.data import bible, text, wmt

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


class RandomAccessSource(Protocol):
  """What `ParallelData.examples` offers: a length and examples by index."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, bytes]:
    ...


@dataclasses.dataclass(frozen=True)
class ParallelData:
  """One split of a parallel corpus.

  Attributes:
    examples: random-access examples; `examples[i]` maps each language code to UTF-8 bytes.
    source_lang: the key of the side to translate from.
    target_lang: the key of the side to translate to.
    name: "dataset/config/version" of the prepared data; it changes whenever the data does.
  """

  examples: RandomAccessSource
  source_lang: str
  target_lang: str
  name: str


def load_split(data_config: ml_collections.ConfigDict, split: str) -> ParallelData:
  """Prepares the configured corpus if needed and opens one of its splits.

  Args:
    data_config: `config.data` (fields dataset, source_lang, target_lang, data_dir, manual_dir,
      text_train, text_validation, text_test, skip_bad_lines).
    split: "train", "validation" or "test".

  Returns:
    The split's examples with the direction of translation.
  """
  check_choice("split", split, SPLITS)
  dataset = data_config.dataset
  check_choice("data.dataset", dataset, DATASETS)
  source, target = data_config.source_lang, data_config.target_lang
  data_dir = data_config.data_dir
  download_config = None
  if dataset in ("bible", "wmt14"):
    module = bible if dataset == "bible" else wmt
    builder = module.make_builder(source, target, data_dir=data_dir)  # Checks the pair.
    if dataset == "wmt14":
      download_config = wmt.download_config(data_config.manual_dir)
  else:
    # text.py names the fields in its errors (text_<split>, source_lang, target_lang).
    builder = text.make_builder(
        split, data_config[f"text_{split}"], source, target,
        skip_bad_lines=data_config.skip_bad_lines, data_dir=data_dir)

  if not builder.is_prepared():
    builder.download_and_prepare(download_config=download_config)
  _log_counts(builder)
  return ParallelData(
      examples=builder.as_data_source(split=split),
      source_lang=source,
      target_lang=target,
      name=f"{builder.name}/{builder.builder_config.name}/{builder.version}",
  )


def _log_counts(builder: tfds.core.DatasetBuilder) -> None:
  """Logs what preparing left out, each time the data is opened, so a run's log shows it."""
  metadata = builder.info.metadata or {}
  for key in ("dropped", "skipped_lines"):
    if key in metadata:
      log.info("%s/%s: %s %s", builder.name, builder.builder_config.name, key,
                   metadata[key])
