"""WMT 2014 English-German and English-French (section 5.1), through tfds' `wmt14_translate`.

The configs are tfds' "de-en" and "fr-en"; the paper translates from English, and either
direction is read from the same prepared data (the caller picks which side is the source).
Splits: train (Europarl v7, Common Crawl, News Commentary v9, and for French also the UN corpus
and the 10^9 French-English corpus), validation (newstest2013) and test (newstest2014).

The data is prepared in array_record format for random access. tfds downloads the archives from
statmt.org, or, when `manual_dir` is given, takes any of them found there under their original
names (MANUAL_FILES); tfds checks each one against its registered size and sha256.

`Wmt14Translate` is tfds' builder with two repairs; it keeps the name "wmt14_translate", so it
reads and writes the same directories as tfds' own.
  * Checksums. tfds 4.9.10 registers those of `wmt14_translate` in
    `url_checksums/wmt14_translate.txt`, which lacks the UN and 10^9 archives that fr-en needs,
    so those two could not be taken from `manual_dir`; their checksums are read from tfds' own
    `wmt13_translate.txt`. (Supplying the table also keeps tfds from resolving the builder's
    source path, which fails on this setup without the `importlib_resources` package.)
  * Extraction without TensorFlow. tfds' extractor writes and reads archive members through
    `tf.io.gfile` (`extractor._copy`, `extractor._open_or_pass`, `tf.compat.as_text`), so it
    fails when TensorFlow is not installed. The builder's `_split_generators` gets the download
    manager wrapped so that archives are unpacked with Python's tarfile/gzip/zipfile instead,
    into the directory tfds would use; downloads, checksums and `manual_dir` stay tfds'.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import os
import shutil
import tarfile
import uuid
import zipfile

import tensorflow_datasets as tfds
import tree
from etils import epath
from tensorflow_datasets.translate import wmt14 as tfds_wmt14

from transformer_jax.data import pairs

CONFIGS = ("de-en", "fr-en")
PAIRS = {config: tuple(config.split("-")) for config in CONFIGS}  # Config name -> its languages.
_DEV = "http://data.statmt.org/wmt19/translation-task/dev.tgz"
_COMMONCRAWL = "http://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz"
_EUROPARL = "http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz"
_NEWS_COMMENTARY = "http://www.statmt.org/wmt14/training-parallel-nc-v9.tgz"
_UN = "http://www.statmt.org/wmt13/training-parallel-un.tgz"
_GIGAFREN = "http://www.statmt.org/wmt10/training-giga-fren.tar"
URLS = {
    "de-en": (_DEV, _COMMONCRAWL, _EUROPARL, _NEWS_COMMENTARY),
    "fr-en": (_DEV, _COMMONCRAWL, _EUROPARL, _NEWS_COMMENTARY, _UN, _GIGAFREN),
}
# What to put in manual_dir to prepare without network access: the archives' own file names.
MANUAL_FILES = {config: tuple(url.rsplit("/", 1)[1] for url in urls)
                for config, urls in URLS.items()}


@functools.cache
def _url_infos() -> dict[str, tfds.core.download.checksums.UrlInfo]:
  """tfds' checksums of wmt14_translate, with those of the two fr-en archives it lacks."""
  checksums_dir = tfds.core.utils.tfds_path() / "url_checksums"
  load = tfds.core.download.checksums.load_url_infos
  infos = dict(load(checksums_dir / "wmt14_translate.txt"))
  wmt13 = load(checksums_dir / "wmt13_translate.txt")
  for url in (_UN, _GIGAFREN):
    infos.setdefault(url, wmt13[url])
  return infos


class Wmt14Translate(tfds_wmt14.Wmt14Translate, skip_registration=True):
  """tfds' `wmt14_translate`, its checksums completed and its extraction free of TensorFlow."""

  name = "wmt14_translate"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional. To prepare without network access, put these files from statmt.org in "
      f"manual_dir under the same names: de-en: {', '.join(MANUAL_FILES['de-en'])}; fr-en: "
      f"also {', '.join(MANUAL_FILES['fr-en'][len(MANUAL_FILES['de-en']):])}.")

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> dict[str, tfds.core.download.checksums.UrlInfo]:
    return _url_infos()

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return super()._split_generators(PythonExtraction(dl_manager))


_Method = tfds.download.ExtractMethod


class PythonExtraction:
  """A tfds DownloadManager whose `extract` and `download_and_extract` need no TensorFlow.

  Everything else is delegated to the wrapped manager. An archive is unpacked to where tfds
  would put it, `<extract_dir>/<METHOD>.<file name>`, through a temporary directory renamed on
  success, and reused when that directory exists.
  """

  def __init__(self, dl_manager: tfds.download.DownloadManager):
    self._dl_manager = dl_manager
    # tfds has no public accessor for it; the default is <download_dir>/extracted.
    self._extract_dir = epath.Path(
        getattr(dl_manager, "_extract_dir", epath.Path(dl_manager.download_dir) / "extracted"))

  def __getattr__(self, name: str):
    return getattr(self._dl_manager, name)

  def download_and_extract(self, url_or_urls):
    """Like DownloadManager.download_and_extract: the same structure of paths comes back."""
    return self.extract(self._dl_manager.download(url_or_urls))

  def extract(self, path_or_paths):
    """Like DownloadManager.extract: one path, or a list/dict of them, unpacked."""
    return tree.map_structure(self._extract_one, path_or_paths)

  def _extract_one(self, path) -> epath.Path:
    path = epath.Path(path)
    method = tfds.download.Resource(path=path).extract_method
    if method == _Method.NO_EXTRACT:
      return path
    target = self._extract_dir / f"{method.name}.{path.name}"
    if target.exists():
      return target
    tmp = self._extract_dir / f"incomplete.{uuid.uuid4().hex}.{path.name}"
    tmp.mkdir(parents=True)
    try:
      unpack(os.fspath(path), method, os.fspath(tmp))
      tmp.rename(target)
    finally:
      if tmp.is_dir():
        shutil.rmtree(tmp)
      elif tmp.exists():
        tmp.unlink()
    return target


def unpack(path: str, method: tfds.download.ExtractMethod, directory: str) -> None:
  """Unpacks an archive into `directory` with the standard library.

  Args:
    path: the archive.
    method: how tfds would extract it (from its file name).
    directory: an existing empty directory. A compressed single file is unpacked to `directory`
      itself, as tfds does: the directory then is the file.
  """
  if method in (_Method.TAR, _Method.TAR_GZ, _Method.TAR_STREAM, _Method.TAR_GZ_STREAM):
    # The "data" filter refuses absolute paths, "..", and links out of the directory; Pythons
    # before 3.10.12 / 3.11.4 lack it.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(path, "r:*") as archive:
      archive.extractall(directory, **safe)
  elif method == _Method.ZIP:
    with zipfile.ZipFile(path) as archive:
      archive.extractall(directory)
  elif method in (_Method.GZIP, _Method.BZIP2):
    opener = gzip.open if method == _Method.GZIP else bz2.open
    os.rmdir(directory)
    with opener(path, "rb") as src, open(directory, "wb") as dst:
      shutil.copyfileobj(src, dst)
  else:
    raise ValueError(f"{path}: extraction method {method} is not supported")


def make_builder(source_lang: str, target_lang: str,
                 data_dir: str | None = None) -> Wmt14Translate:
  """The array_record builder for a language pair (not prepared yet if it is new).

  Args:
    source_lang: a language code; the pair in either direction of a config.
    target_lang: the other language code.
    data_dir: tfds data_dir; None means tfds' default.

  Returns:
    The builder; prepare it with `download_and_prepare(download_config=download_config(...))`.
  """
  return Wmt14Translate(config=pairs.config_for("wmt14", PAIRS, source_lang, target_lang),
                        data_dir=data_dir,
                        file_format="array_record")


def download_config(manual_dir: str | None = None) -> tfds.download.DownloadConfig:
  """Download options: archives already in `manual_dir` are used instead of downloading them."""
  return tfds.download.DownloadConfig(manual_dir=manual_dir)
