"""The commands of README.md and docs/*.md work as written, at tiny sizes.

A code block with `<!-- runnable -->` on the line before its fence is run, command by command and
block by block in the document's order, in a temporary directory holding `train.py`, `configs/`,
a tiny made-up corpus (`CORPUS`: train.tsv, validation.tsv and test.tsv, the same pairs as
line-aligned `.en` and `.de` files, and input.txt) and a tiny trained run at `runs/quickstart`,
standing in for the main job's. The test appends its own overrides to each command (`TINY_RUN`,
`TINY_MODEL`): the documents show the real command, the test only makes it small, so a renamed
flag, field or command fails here instead of for a reader. A `bash` block holds simple commands
(`<` and `>` redirections, no pipes); a `python` block is run as a script. `<!-- runnable slow -->`
marks the slow ones: the default run leaves them out, the slow test of the same document runs
them all.

Every `train.py` and `transformer-compile` command in a shell block, runnable or not (a TPU pod
slice, SLURM, a GPU), has its flags parsed and its config validated as train.py would.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from unittest import mock

import pytest
from absl import flags
from ml_collections import config_flags

from transformer_jax.config import validate_run_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = 300  # Seconds for one command.
MARKER = re.compile(r"<!-- runnable( slow)? -->")
SHELLS = ("bash", "sh")

TINY_MODEL = ["--config.model.vocab_size=64", "--config.model.d_model=32", "--config.model.d_ff=64",
              "--config.model.num_heads=2", "--config.model.num_layers=1"]
TINY_RUN = ["--config.train.num_steps=2", "--config.train.time_budget_minutes=0", "--config.train.log_every=1",
            "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
            "--config.train.eval_bleu_sentences=4", "--config.train.test_sentences=4",
            "--config.train.samples_to_print=1", "--config.decode.beam_size=2",
            "--config.data.tokens_per_batch=512", "--config.data.tokenizer_max_sentences=1000",
            "--config.data.data_dir=tfds"]
TINY_COMPILE = [*TINY_MODEL, "--config.model.max_len=32", "--config.data.tokens_per_batch=256"]
WORDS = ["red", "old", "big", "cat", "dog", "river", "house", "went", "to", "the", "saw", "a"]


def corpus(directory: pathlib.Path) -> None:
  """The made-up corpus the documents' commands name: a target is its source reversed."""
  import random
  rng = random.Random(0)
  for split, n in (("train", 200), ("validation", 16), ("test", 16)):
    pairs = []
    for _ in range(n):
      words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
      pairs.append((" ".join(words), " ".join(reversed(words))))
    (directory / f"{split}.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    (directory / f"{split}.en").write_text("".join(f"{s}\n" for s, _ in pairs))
    (directory / f"{split}.de").write_text("".join(f"{t}\n" for _, t in pairs))
  (directory / "input.txt").write_text("the red cat\na dog went to the river\n")


def fenced_blocks(text: str) -> list[tuple[str, str, str]]:
  """Every fenced code block: (the line before its fence, its language, its text)."""
  found, lines, i = [], text.splitlines(keepends=True), 0
  while i < len(lines):
    if lines[i].startswith("```"):
      language, start = lines[i][3:].strip(), i
      i += 1
      while i < len(lines) and not lines[i].startswith("```"):
        i += 1
      found.append((lines[start - 1].strip() if start else "", language, "".join(lines[start + 1:i])))
    i += 1
  return found


def blocks(document: pathlib.Path) -> list[tuple[bool, str, str]]:
  """The document's runnable blocks: (slow, language, text)."""
  return [(bool(marker[1]), language, text) for before, language, text in fenced_blocks(document.read_text())
          if (marker := MARKER.fullmatch(before))]


def commands(text: str) -> list[list[str]]:
  """A bash block's commands, each as words: continuation lines joined, comments dropped."""
  lexer_lines = text.replace("\\\n", " ").splitlines()
  return [words for line in lexer_lines if (words := shlex.split(line, comments=True))]


def with_overrides(words: list[str]) -> list[str]:
  """The command with the test's sizes appended (after the document's own flags, so they win)."""
  if words[:2] in (["python", "train.py"], ["python3", "train.py"]):
    config = next((w.split("=", 1)[-1] for w in words if w.startswith("--config=")), None)
    if config is None and "--config" in words:
      config = words[words.index("--config") + 1]
    model = [] if config and config.startswith("configs/marian.py") else TINY_MODEL
    return [sys.executable, "train.py", *words[2:], *model, *TINY_RUN]
  if words[0] == "transformer-compile":
    return [*words, *TINY_COMPILE]
  return words


def environment() -> dict[str, str]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}"
         f"{os.environ.get('PATH', '')}", "TRANSFORMER_JAX_TRACEBACK": "1"}
  env.pop("XLA_FLAGS", None)  # conftest's 8 devices are for the tests' own process.
  return env


def run_command(words: list[str], cwd: pathlib.Path) -> None:
  stdin = stdout = None
  for operator in ("<", ">"):
    while operator in words:
      i = words.index(operator)
      target = cwd / words[i + 1]
      if operator == "<":
        stdin = target.open("rb")
      else:
        stdout = target.open("wb")
      del words[i:i + 2]
  assert not {"|", "&&", ";", ">>"} & set(words), f"a runnable command must be simple: {words}"
  if words[0] == "transformer-compile" and "--topology" in words and not words[
      words.index("--topology") + 1].startswith("cpu:") and importlib.util.find_spec("libtpu") is None:
    pytest.skip('compiling for a TPU slice needs libtpu: pip install -e ".[tpu]"')
  command = with_overrides(words)
  try:
    result = subprocess.run(command, cwd=cwd, env=environment(), stdin=stdin,
                            stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT)
  finally:
    for stream in (stdin, stdout):
      if stream:
        stream.close()
  if result.returncode != 0:
    output = (result.stdout or b"").decode(errors="replace")[-2000:] + result.stderr.decode(errors="replace")[-4000:]
    raise AssertionError(f"documented command failed (exit {result.returncode}):\n  {shlex.join(words)}\n"
                         f"run as:\n  {shlex.join(command)}\n{output}")


def run_block(language: str, text: str, cwd: pathlib.Path) -> None:
  if language == "python":
    script = cwd / "block.py"
    script.write_text(text)
    _run_python(script, cwd)
  else:
    assert language in SHELLS, f"runnable blocks are bash or python, not {language}"
    for words in commands(text):
      run_command(words, cwd)


def _run_python(script: pathlib.Path, cwd: pathlib.Path) -> None:
  result = subprocess.run([sys.executable, str(script)], cwd=cwd, env=environment(), capture_output=True,
                          text=True, timeout=TIMEOUT)
  assert result.returncode == 0, f"documented Python failed:\n{script.read_text()}\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> pathlib.Path:
  """A tiny run standing in for the main job's `runs/quickstart`, trained once for the module."""
  directory = tmp_path_factory.mktemp("quickstart")
  setup_directory(directory, None)
  run_command(["python", "train.py", "--config", "configs/text.py", "--workdir", "runs/quickstart",
               "--config.data.text_train=train.tsv", "--config.data.text_validation=validation.tsv",
               "--config.data.text_test=test.tsv"], directory)
  return directory / "runs" / "quickstart"


def setup_directory(directory: pathlib.Path, quickstart: pathlib.Path | None) -> None:
  (directory / "train.py").symlink_to(ROOT / "train.py")
  (directory / "configs").symlink_to(ROOT / "configs")
  corpus(directory)
  if quickstart is not None:
    shutil.copytree(quickstart, directory / "runs" / "quickstart", symlinks=True)


def run_document(document: pathlib.Path, directory: pathlib.Path, quickstart: pathlib.Path, *, slow: bool) -> None:
  setup_directory(directory, quickstart)
  for block_slow, language, text in blocks(document):
    if block_slow and not slow:
      continue
    if "models/opus-mt-en-de" in text:  # The fine-tuning guide: a Marian model built by the tests.
      marian_model(directory / "models" / "opus-mt-en-de")
    run_block(language, text, directory)


def marian_model(directory: pathlib.Path) -> None:
  """A tiny Marian model laid out as the published opus-mt models are (test_marian_import's)."""
  if directory.exists():
    return
  import test_marian_import
  directory.mkdir(parents=True)
  test_marian_import.write_marian_model(directory)


FAST = [d for d in DOCUMENTS if any(not slow for slow, _, _ in blocks(d))]
WITH_SLOW = [d for d in DOCUMENTS if any(slow for slow, _, _ in blocks(d))]


@pytest.mark.parametrize("document", FAST, ids=lambda p: p.name)
def test_the_documented_commands_run(document, tmp_path, quickstart_run):
  run_document(document, tmp_path, quickstart_run, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("document", WITH_SLOW, ids=lambda p: p.name)
def test_the_documented_commands_run_slow_ones_included(document, tmp_path, quickstart_run):
  run_document(document, tmp_path, quickstart_run, slow=True)


def test_the_key_commands_are_runnable():
  """The own-text training, translate, transformer-evaluate, both exports and a compile run by
  default; the README shows the own-text command."""
  fast = "\n".join(text for d in DOCUMENTS for slow, _, text in blocks(d) if not slow)
  readme = "\n".join(text for _, _, text in blocks(ROOT / "README.md"))
  assert "python train.py --config configs/text.py" in readme
  for command in ("translate ", "transformer-evaluate ", "transformer-export ", "--format ctranslate2",
                  "transformer-compile "):
    assert command in fast, command


# ----------------------------------------------------------------------------- flags of every command


def flag_definitions(path: pathlib.Path) -> list[tuple[str, str]]:
  """(DEFINE function, flag name) of every absl flag a script defines, but the config file's."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Call) and getattr(node.func, "attr", "").startswith("DEFINE_"):
      name = node.args[0].value
      if name != "config":
        found.append((node.func.attr, name))
  return found


SCRIPTS = {"train.py": ROOT / "train.py", "transformer-compile": ROOT / "transformer_jax" / "cli" / "compile.py"}


def parse_flags(script: str, argv: list[str]):
  """`argv` parsed as `script` parses it (its own flags and the config file's overrides)."""
  argv = [script, *(re.sub(r"^(--config=?)?configs/", lambda m: (m.group(1) or "") + f"{ROOT}/configs/", a)
                    for a in argv)]
  values = flags.FlagValues()
  with mock.patch.object(sys, "argv", argv):  # config_flags reads the overrides from sys.argv.
    config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "small.py"), flag_values=values,
                                    lock_config=True)
    for kind, name in flag_definitions(SCRIPTS[script]):
      define = flags.DEFINE_bool if kind == "DEFINE_bool" else flags.DEFINE_string  # Values may be placeholders.
      define(name, None, "", flag_values=values)
    values(argv)
  return values.config


def invocations(text: str) -> list[tuple[str, list[str]]]:
  """Every train.py and transformer-compile command in a block, quoted ones (ssh --command=...)
  included: (script, its arguments)."""
  found = []

  def scan(words: list[str]) -> None:
    for i, word in enumerate(words):
      if " " in word:
        scan(shlex.split(word.split("=", 1)[-1] if word.startswith("--") else word))
      elif word == "train.py" or word.endswith("/train.py") or word == "transformer-compile":
        arguments = []
        for argument in words[i + 1:]:
          if argument in ("&&", ";", "|", "<", ">"):
            break
          arguments.append(argument)
        found.append(("transformer-compile" if word == "transformer-compile" else "train.py", arguments))

  for words in commands(text):
    scan(words)
  return found


DOCUMENTED = [(document.name, script, arguments) for document in DOCUMENTS
              for _, language, text in fenced_blocks(document.read_text()) if language in SHELLS
              for script, arguments in invocations(text)]


@pytest.mark.parametrize("document, script, arguments", DOCUMENTED,
                         ids=[f"{d}:{s} {' '.join(a)[:50]}" for d, s, a in DOCUMENTED])
def test_every_documented_command_has_valid_flags(document, script, arguments):
  if any(a.startswith("configs/marian.py") or a.startswith("--config=configs/marian.py") for a in arguments):
    pytest.skip("configs/marian.py reads a model directory; the fine-tuning guide's command runs (slow)")
  validate_run_config(parse_flags(script, arguments))


def test_the_flag_check_finds_commands_in_ssh_and_srun_lines():
  text = ('gcloud ssh NAME --command="cd x && .venv/bin/python \\\n  train.py --config configs/base.py"\n'
          "srun --nodes=2 .venv/bin/python train.py --config.model.dtype=bfloat16\n")
  assert invocations(text) == [("train.py", ["--config", "configs/base.py"]),
                               ("train.py", ["--config.model.dtype=bfloat16"])]
  with pytest.raises(Exception, match="num_head"):
    parse_flags("train.py", ["--config.model.num_head=16"])
