"""The documentation: the site builds with warnings as errors, the generated references cover the
code (every config field, every module), and the README stays a front door that matches the tree
and CI. The documents' commands are run by test_doc_commands.py."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
GUIDES = sorted((ROOT / "docs").glob("*.md"))


def hooks():
  spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_site_builds_with_warnings_as_errors(tmp_path):
  pytest.importorskip("mkdocstrings_handlers.python", reason='needs the docs extra: pip install -e ".[docs]"')
  result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert (tmp_path / "reference" / "config" / "index.html").exists()
  api = (tmp_path / "reference" / "api" / "transformer_jax.model" / "index.html").read_text()
  assert "Transformer" in api and "section 3" in api  # Rendered from the docstrings.
  assert "28.6" in (tmp_path / "benchmarks" / "index.html").read_text()  # BENCHMARKS.md's page.


def test_the_config_reference_has_every_field_with_its_meaning():
  from transformer_jax.config import base_config
  module = hooks()
  page = module.config_reference()
  rows = {line.split(" | ")[0].strip("| `"): line for line in page.splitlines() if line.startswith("| `")}
  fields = module.fields(base_config())
  assert len(fields) > 60
  for field in fields:
    assert field in rows, field
    meaning = rows[field].rstrip(" |").rsplit(" | ", 1)[-1]
    assert meaning.strip(), f"{field} has no comment in base_config() or docstring in TransformerConfig"


def test_the_config_reference_shows_the_accepted_values_and_sections():
  from transformer_jax import config
  page = hooks().config_reference()
  row = lambda field: next(line for line in page.splitlines() if line.startswith(f"| `{field}` |"))
  assert all(f'`"{choice}"`' in row("train.schedule") for choice in config.SCHEDULES)
  assert all(f'`"{choice}"`' in row("model.attention_impl") for choice in config.ATTENTION_IMPLS)
  assert all(f'`"{choice}"`' in row("data.dataset") for choice in config.DATASETS)
  assert "integer >= 1" in row("train.warmup_steps") and "number > 0.0" in row("train.adam_eps")
  assert "< 1" in row("train.label_smoothing") and "| 5.3 |" in row("train.warmup_steps")
  assert "big: `4096`" in row("model.d_ff")  # The config files that change a field.
  assert set(config.PAPER_SECTIONS) <= set(hooks().fields(config.base_config()))


def test_there_is_an_api_page_for_every_module_and_a_page_for_every_guide():
  module = hooks()
  modules = module.api_modules()
  assert "transformer_jax.model" in modules and "transformer_jax.data.pipeline" in modules
  assert len(modules) == len([p for p in (ROOT / "transformer_jax").rglob("*.py") if p.name != "__init__.py"])
  nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
  for guide in GUIDES:
    assert re.search(rf": {re.escape(guide.name)}$", nav, re.M), f"{guide.name} is not in mkdocs.yml's nav"
    assert f"](docs/{guide.name})" in README, f"the README does not list {guide.name}"


def test_the_readme_reaches_a_command_early_and_stays_short():
  lines = README.splitlines()
  assert lines.index("```bash") < 25
  assert len(lines) <= 220


def test_the_readme_test_command_is_the_one_ci_runs():
  ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
  assert len(ci) == 1 and ci[0] in README.splitlines()
  assert ".[test,hf,tpu,ct2,docs]" in ci[0]


def test_the_readme_layout_matches_the_tree():
  layout = README.split("## Layout", 1)[1].split("```")[1].splitlines()
  top = {line.split()[0] for line in layout if line and not line.startswith(" ")}
  package = {line.split()[0] for line in layout if line.startswith("  ") and line.strip()}
  for name in top:
    assert (ROOT / name).exists(), f"the README's layout names {name}, which does not exist"
  tree = {p.name for p in (ROOT / "transformer_jax").glob("*.py") if p.name != "__init__.py"}
  tree |= {f"{p.name}/" for p in (ROOT / "transformer_jax").iterdir() if (p / "__init__.py").exists()}
  assert package == tree, f"missing from the layout: {sorted(tree - package)}; gone: {sorted(package - tree)}"
