"""Language pairs of the corpora whose tfds configs each hold one pair, read in either direction."""

from __future__ import annotations

from collections.abc import Mapping

from transformer_jax.errors import ConfigError


def directions(pairs: Mapping[str, tuple[str, str]]) -> list[str]:
  """Every accepted (source, target) direction of `pairs` (config name -> its two languages), as
  "src-tgt"."""
  return [f"{a}-{b}" for x, y in pairs.values() for a, b in ((x, y), (y, x))]


def config_for(dataset: str, pairs: Mapping[str, tuple[str, str]], source_lang: str,
               target_lang: str) -> str:
  """The config of `pairs` that holds the two languages, in either direction.

  Raises:
    ConfigError: naming the fields and the accepted directions, if no config holds the pair.
  """
  for name, languages in pairs.items():
    if {source_lang, target_lang} == set(languages) and source_lang != target_lang:
      return name
  raise ConfigError(
      f"data.source_lang={source_lang!r}, data.target_lang={target_lang!r} is not a language pair "
      f"of data.dataset={dataset!r}; accepted (source-target): {', '.join(directions(pairs))}")
