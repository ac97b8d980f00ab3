"""Parallel corpora from another domain than the Bible, built from what a Linux machine holds: the
message catalogs (gettext .mo files) that programs ship with their translations. Each catalog
pairs a program's English messages with their translation: software interface text (menus,
errors, help), short and varied, a domain far from scripture.

  python -m bench.corpora --lang de --out /tmp/gettext-en-de      # train/validation/test.tsv

Pairs are deduplicated by source; messages that are not text (no word outside printf
placeholders, a single token copied unchanged such as a language name, longer than --max_chars)
are dropped; placeholders are kept (they are part of the text to translate). The split is by catalog (program),
so that validation and test measure translation of programs the model has not seen: a seeded
shuffle of the catalogs, the first ones to test and validation until each has --held_out pairs.
More catalogs come with more Debian packages (`apt-get install` of a desktop's programs adds tens
of thousands of pairs). Not used by the tests (they make their own tiny data).
"""

from __future__ import annotations

import argparse
import gettext
import glob
import os
import random
import re

WORD = re.compile(r"[^\W\d_]{2,}")  # Two letters in a row: a word.
PLACEHOLDER = re.compile(r"%[-#0-9.lhzjt]*[a-zA-Z]|\{[^}]*\}")  # printf and format fields.


def catalog_pairs(path: str, max_chars: int) -> list[tuple[str, str]]:
  """The (English, translation) pairs of one .mo file that read as text."""
  try:
    with open(path, "rb") as f:
      catalog = gettext.GNUTranslations(f)._catalog
  except (OSError, ValueError):  # Unreadable, or not a UTF-8 catalog (UnicodeDecodeError).
    return []
  pairs = []
  for source, target in catalog.items():
    if not isinstance(source, str) or not isinstance(target, str) or not source or not target:
      continue  # Plural forms (tuple keys) and the header (empty key).
    source, target = " ".join(source.split()), " ".join(target.split())
    if (len(source) > max_chars or len(target) > max_chars
        or not WORD.search(PLACEHOLDER.sub("", source))
        or "\t" in source + target or (source == target and " " not in source)):
      continue
    pairs.append((source, target))
  return pairs


def build(lang: str, out: str, *, held_out: int = 1000, max_chars: int = 200, seed: int = 0,
          locale_dir: str = "/usr/share/locale") -> dict[str, int]:
  """Writes OUT/{train,validation,test}.tsv and returns the number of pairs in each."""
  catalogs = sorted(glob.glob(os.path.join(locale_dir, lang, "LC_MESSAGES", "*.mo")))
  random.Random(seed).shuffle(catalogs)
  seen: set[str] = set()
  splits: dict[str, list[tuple[str, str]]] = {"test": [], "validation": [], "train": []}
  for path in catalogs:
    pairs = [(s, t) for s, t in catalog_pairs(path, max_chars) if s not in seen]
    seen.update(s for s, _ in pairs)
    name = ("test" if len(splits["test"]) < held_out else
            "validation" if len(splits["validation"]) < held_out else "train")
    splits[name] += pairs
  os.makedirs(out, exist_ok=True)
  for name, pairs in splits.items():
    with open(os.path.join(out, f"{name}.tsv"), "w", encoding="utf-8") as f:
      f.writelines(f"{s}\t{t}\n" for s, t in pairs)
  return {name: len(pairs) for name, pairs in splits.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lang", default="de", help="the target language's locale directory name")
  parser.add_argument("--out", required=True, help="directory for train/validation/test.tsv")
  parser.add_argument("--held_out", type=int, default=1000,
                      help="pairs (at least) for validation and test")
  parser.add_argument("--max_chars", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  counts = build(args.lang, args.out, held_out=args.held_out, max_chars=args.max_chars,
                 seed=args.seed)
  print(", ".join(f"{name} {n:,} pairs" for name, n in counts.items()), "in", args.out)


if __name__ == "__main__":
  main()
