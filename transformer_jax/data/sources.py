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

import contextlib
import dataclasses
import importlib.util
import logging
import os
from typing import Protocol

import ml_collections
import tensorflow_datasets as tfds

from transformer_jax.config import DATASETS, check_choice
from transformer_jax.constants import SPLITS
from transformer_jax.data import bible, text, wmt
from transformer_jax.errors import DataError

log = logging.getLogger(__name__)



class RandomAccessSource(Protocol):
  """What `ParallelData.examples` offers: a length and examples by index."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, bytes]:
    ...


def read_many(examples: RandomAccessSource, keys) -> list:
  """`[examples[k] for k in keys]`, read as one batch where the source can (tfds' array_record
  sources read a batch about 7x faster per example than one at a time)."""
  keys = [int(k) for k in keys]
  if hasattr(examples, "__getitems__"):
    return list(examples.__getitems__(keys))
  return [examples[k] for k in keys]


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
    with _shuffle_in_memory():
      builder.download_and_prepare(download_config=download_config)
  _log_counts(builder)
  return ParallelData(
      examples=builder.as_data_source(split=split),
      source_lang=source,
      target_lang=target,
      name=f"{builder.name}/{builder.builder_config.name}/{builder.version}",
  )


@contextlib.contextmanager
def _shuffle_in_memory():
  """tfds shuffles a split's serialized examples in memory up to 1 GB and spills larger splits
  (WMT en-de is about 1.3 GB) to disk through `tf.io.gfile`, which needs TensorFlow. Without
  TensorFlow, the limit is raised to 3/4 of the machine's memory while preparing."""
  if importlib.util.find_spec("tensorflow") is not None:
    yield
    return
  from tensorflow_datasets.core import shuffle
  saved = shuffle.MAX_MEM_BUFFER_SIZE
  memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  shuffle.MAX_MEM_BUFFER_SIZE = max(saved, int(0.75 * memory))
  try:
    yield
  except ModuleNotFoundError as e:
    if e.name != "tensorflow":
      raise
    raise DataError(
        f"this split is larger than 3/4 of this machine's memory ({memory / 2**30:.0f} GiB), and tfds "
        "shuffles larger splits on disk through TensorFlow: install tensorflow-cpu, or prepare "
        "the data on a machine with more memory (then point data.data_dir at it)") from e
  finally:
    shuffle.MAX_MEM_BUFFER_SIZE = saved


def _log_counts(builder: tfds.core.DatasetBuilder) -> None:
  """Logs what preparing left out, each time the data is opened, so a run's log shows it."""
  metadata = builder.info.metadata or {}
  for key in ("dropped", "skipped_lines"):
    if key in metadata:
      log.info("%s/%s: %s %s", builder.name, builder.builder_config.name, key,
                   metadata[key])
