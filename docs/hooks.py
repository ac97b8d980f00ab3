"""The pages MkDocs generates at every build (mkdocs.yml names this file a hook).

- `index.md` and `benchmarks.md`: README.md and BENCHMARKS.md, their links to each other and to
  docs/ rewritten for the site, with the plots they show; the guides' links to them likewise.
- `reference/config.md`: every field of `transformer_jax.config.base_config()`, its default, the
  values it accepts (the choice tuples and bounds that config.py validates with), the section of
  the paper it follows (`config.PAPER_SECTIONS`), the config files that change it and what it means
  (`TransformerConfig`'s docstring, the comments beside each field in `base_config`).
- `reference/api/MODULE.md`: a page per module of the package, rendered by mkdocstrings from its
  docstrings, listed in the navigation under "API reference".

Nothing here is written by hand per field or per module, so the reference cannot drift from the
code; tests/test_docs.py checks that every field appears and builds the site with --strict.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import pathlib
import textwrap
import tokenize
import typing

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "transformer_jax"
CONFIG_FILES = ("small", "base", "big", "text")  # configs/marian.py needs a model directory.
SECTIONS = {
    "": "The run", "model": "`model`: the architecture (`TransformerConfig`)",
    "train": "`train`: optimisation, validation, checkpoints", "mesh": "`mesh`: devices and sharding",
    "data": "`data`: corpus, tokenizer, batches", "decode": "`decode`: beam search (section 6.1)",
}
MESH_AXES_ACCEPTED = "integer >= 1, or -1 (the devices left)"


# ----------------------------------------------------------------------------- the API pages


def api_modules() -> list[str]:
  """Every module of the package (not the packages' `__init__`), in file order."""
  names = []
  for path in sorted(PACKAGE.rglob("*.py")):
    if path.name != "__init__.py" and "__pycache__" not in path.parts:
      names.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
  return names


def api_page(module: str) -> str:
  return f"# `{module}`\n\n::: {module}\n"


# ----------------------------------------------------------------------------- the config reference


def _comments_by_field() -> dict[str, str]:
  """The comments that describe each field in `base_config`: the comment lines right above its
  assignment and the comment at the end of its line."""
  from transformer_jax import config as config_module
  source = textwrap.dedent(inspect.getsource(config_module.base_config))
  lines = source.splitlines()
  trailing = {}
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT and lines[token.start[0] - 1].strip() != token.string:
      trailing[token.start[0]] = token.string.lstrip("#").strip()
  found = {}
  for node in ast.walk(ast.parse(source)):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    path = ast.unparse(node.targets[0])
    if not path.startswith("config.") or path.count(".") > 2:
      continue
    above, row = [], node.lineno - 1
    while row >= 1 and lines[row - 1].strip().startswith("#"):
      above.insert(0, lines[row - 1].strip().lstrip("#").strip())
      row -= 1
    text = " ".join(above + ([trailing[node.end_lineno]] if node.end_lineno in trailing else []))
    value = node.value
    if isinstance(value, ast.Call) and getattr(value.func, "attr", "") == "get_ref":  # A reference.
      followed = f"{ast.unparse(value.func.value).removeprefix('config.')}.{value.args[0].value}"
      text = f"{text} Follows `{followed}` unless set.".strip()
    found[path.removeprefix("config.")] = text
  return found


def _model_attribute_docs() -> dict[str, str]:
  """`TransformerConfig`'s Attributes section: field -> its description."""
  from transformer_jax.config import TransformerConfig
  docs, name = {}, None
  for line in inspect.getdoc(TransformerConfig).split("Attributes:", 1)[1].splitlines():
    if line.startswith("  ") and not line.startswith("    ") and ":" in line:
      name, text = line.strip().split(":", 1)
      docs[name] = text.strip()
    elif line.startswith("    ") and name:
      docs[name] += " " + line.strip()
  return docs


def _choices() -> dict[str, tuple[str, ...]]:
  """field -> accepted values, from every `check_choice(NAME, value, TUPLE)` call in config.py
  (the model's fields are checked under their bare names)."""
  from transformer_jax import config as config_module
  found = {}
  for node in ast.walk(ast.parse((PACKAGE / "config.py").read_text())):
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "check_choice":
      name, choices = node.args[0].value, getattr(config_module, node.args[2].id)
      found[name if "." in name else f"model.{name}"] = choices
  return found


def _accepted(field: str, default: typing.Any) -> str:
  from transformer_jax import config as config_module
  choices = _choices()
  if field in choices:
    return ", ".join(f'`"{c}"`' for c in choices[field])
  if field in config_module._RUN_FIELDS:
    kind, low, open_low = config_module._RUN_FIELDS[field]
    text = f"{'integer' if kind == 'int' else 'number'} {'>' if open_low else '>='} {low}"
    return text + (", < 1" if field in config_module._BELOW_ONE else "")
  section, _, name = field.rpartition(".")
  if section == "model" and name in config_module._POSITIVE_MODEL_FIELDS:
    return "integer >= 1"
  if field in ("model.d_k", "model.d_v"):
    return "integer >= 1, or None (d_model / num_heads)"
  if section == "mesh" and name != "rules":
    return MESH_AXES_ACCEPTED
  if isinstance(default, bool):
    return "`true`, `false`"
  return {str: "a string", float: "a number", int: "an integer", tuple: "pairs (name, mesh axes)",
          type(None): "a path, or None"}.get(type(default), type(default).__name__)


def _format(value: typing.Any) -> str:
  if isinstance(value, tuple):
    return "<br>".join(f"`{name} -> {axes}`" for name, axes in value)
  if isinstance(value, str):
    return f'`"{value}"`'
  if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
    return f"`{value:_}`"
  return f"`{value}`"


def fields(config) -> list[str]:
  """Every leaf field of a ConfigDict, dotted (`train.num_steps`)."""
  out = []
  for key, value in config.items():
    if hasattr(value, "items"):
      out.extend(f"{key}.{leaf}" for leaf in fields(value))
    else:
      out.append(key)
  return out


def _get(config, field: str) -> typing.Any:
  for part in field.split("."):
    config = config[part]
  return config


def config_reference() -> str:
  """The configuration reference page, as Markdown."""
  from transformer_jax import config as config_module
  base = config_module.base_config()
  files = {name: config_module.load_config_file(ROOT / "configs" / f"{name}.py") for name in CONFIG_FILES}
  comments, model_docs = _comments_by_field(), _model_attribute_docs()
  model_fields = {f.name for f in dataclasses.fields(config_module.TransformerConfig)}
  out = [
      "# Configuration reference",
      "",
      "Generated from `transformer_jax.config` at every build of these pages: every field of",
      "`base_config()` (the paper's base model, Table 3), its default, the values `train.py` accepts",
      "(checked before any work starts), the section of the paper it follows, and the config files in",
      "`configs/` that set another value. Override any field on the command line of `train.py` or",
      "`transformer-compile`: `--config.train.num_steps=1000`; a misspelled field is an error.",
      "",
  ]
  # In the order a reader meets them: the dataclass's, then base_config's lines.
  order = [f"model.{f.name}" for f in dataclasses.fields(config_module.TransformerConfig)] + list(comments)
  all_fields = sorted(fields(base), key=lambda f: order.index(f) if f in order else len(order))
  for section, title in SECTIONS.items():
    rows = [f for f in all_fields if (f.rpartition(".")[0] == section)]
    out += [f"## {title}", "", "| field | default | accepted | paper | set by | meaning |",
            "|---|---|---|---|---|---|"]
    for field in rows:
      default = _get(base, field)
      name = field.rpartition(".")[2]
      meaning = model_docs.get(name, "") if section == "model" and name in model_fields else ""
      meaning = meaning or comments.get(field, "")
      changed = [f"{file}: {_format(_get(cfg, field))}" for file, cfg in files.items()
                 if _get(cfg, field) != default]
      cells = [f"`{field}`", _format(default), _accepted(field, default),
               config_module.PAPER_SECTIONS.get(field, ""), "<br>".join(changed), meaning]
      out.append("| " + " | ".join(c.replace("|", "\\|") if i != 1 else c for i, c in enumerate(cells)) + " |")
    out.append("")
  return "\n".join(out)


# ----------------------------------------------------------------------------- README and BENCHMARKS

# Links as GitHub resolves them (from the root, or from docs/) -> the site's pages.
_SITE_LINKS = (("](docs/", "]("), ("](../BENCHMARKS.md", "](benchmarks.md"), ("](BENCHMARKS.md", "](benchmarks.md"),
               ("](../README.md", "](index.md"), ("](README.md", "](index.md"))


def site_markdown(markdown: str) -> str:
  for old, new in _SITE_LINKS:
    markdown = markdown.replace(old, new)
  return markdown


def plots() -> list[str]:
  return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bench" / "plots").glob("*.png"))


# ----------------------------------------------------------------------------- MkDocs' events


def on_config(config, **kwargs):
  """Adds the API pages to the navigation, grouped by package."""
  top: list = []  # The package's modules, then one group per subpackage (cli, data).
  for module in api_modules():
    package, _, name = module.rpartition(".")
    page = {name: f"reference/api/{module}.md"}
    if package == "transformer_jax":
      top.append(page)
    else:
      group = package.removeprefix("transformer_jax.") + "/"
      if not (top and group in top[-1]):
        top.append({group: []})
      top[-1][group].append(page)
  config["nav"].append({"API reference": top})
  return config


def on_files(files, config, **kwargs):
  from mkdocs.structure.files import File
  for page, source in (("index.md", "README.md"), ("benchmarks.md", "BENCHMARKS.md")):
    files.append(File.generated(config, page, content=site_markdown((ROOT / source).read_text())))
  for plot in plots():
    files.append(File.generated(config, plot, abs_src_path=str(ROOT / plot)))
  files.append(File.generated(config, "reference/config.md", content=config_reference()))
  for module in api_modules():
    files.append(File.generated(config, f"reference/api/{module}.md", content=api_page(module)))
  return files


def on_page_markdown(markdown, page, config, files, **kwargs):
  return site_markdown(markdown)
