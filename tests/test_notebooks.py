"""The notebooks in notebooks/: each one runs from top to bottom in fast mode, and none is saved
with outputs.

Fast mode (TRANSFORMER_JAX_FAST=1) makes every notebook train a tiny model for a few steps; the
code is the same as in the default mode. The kernel is the interpreter running the tests, with this
checkout first on its path. Needs the `test` extra (nbclient, nbformat, ipykernel, matplotlib).
"""

import json
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # Per cell; in fast mode none takes more than about a minute on 2 CPU cores.


def test_the_three_notebooks_are_there():
  assert [p.name for p in NOTEBOOKS] == [
      "01_attention_explained.ipynb", "02_train_and_translate.ipynb", "03_checkpoint_and_resume.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_saved_without_outputs(path):
  notebook = json.loads(path.read_text(encoding="utf-8"))
  for index, cell in enumerate(notebook["cells"]):
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, (
          f"{path.name}, cell {index} has outputs; clear them before committing (e.g. nbstripout)")
    assert not cell.get("attachments"), f"{path.name}, cell {index} has attachments"
  assert "widgets" not in notebook["metadata"], f"{path.name} carries widget state"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(path, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  pytest.importorskip("matplotlib")

  # The kernel inherits this environment.
  monkeypatch.setenv("TRANSFORMER_JAX_FAST", "1")
  monkeypatch.setenv("TRANSFORMER_JAX_RUNS", str(tmp_path / "runs"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # conftest's 8 fake devices are for the sharding tests.

  notebook = nbformat.read(path, as_version=4)
  # A last cell reports which interpreter ran the notebook.
  notebook.cells.append(nbformat.v4.new_code_cell(
      "import json, sys\nprint(json.dumps({'prefix': sys.prefix, 'fast': FAST}))"))
  client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  client.execute()  # Raises CellExecutionError, naming the cell, if any cell fails.

  report = json.loads("".join(o.get("text", "") for o in notebook.cells[-1].outputs))
  assert report == {"prefix": sys.prefix, "fast": True}, "the kernel ran another Python environment"
  for cell in notebook.cells:
    assert not [o for o in cell.get("outputs", []) if o.output_type == "error"]
