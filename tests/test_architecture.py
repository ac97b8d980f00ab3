"""The package's shape: imports run one way (no cycle, lazy imports included) and no module grows
past about 400 lines."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "transformer_jax"
MAX_LINES = 400


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The package's modules that `path` imports anywhere in its body (functions and TYPE_CHECKING
  blocks too), `from transformer_jax import x` counted as importing transformer_jax.x."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module)
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
  return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
  paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
  modules = set(paths)
  # A package's __init__ runs before its modules, so importing one imports the package: an edge
  # to a module is also an edge to every package above it, except the importer's own packages.
  graph = {}
  for name, path in paths.items():
    edges = package_imports(path, modules)
    graph[name] = {m for m in edges if m != name and not name.startswith(m + ".")}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, str] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_imports_run_one_way():
  graph = import_graph()
  assert "transformer_jax.trainer" in graph and graph["transformer_jax.trainer"]
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_data_package_never_imports_flax():
  for path in (PACKAGE / "data").glob("*.py"):
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(name.split(".")[0] == "flax" for name in names), path.name


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_module_is_over_400_lines(path):
  lines = len(path.read_text().splitlines())
  assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines"


def test_the_papers_modules_reach_the_speed_kernels_only_through_the_one_switch():
  """layers.py and attention.py never import kernels.py; model.py names it only in
  `feed_forward`, the switch on `config.cpu_kernels`; losses.py is the paper's loss alone."""
  graph = import_graph()
  for name in ("layers", "attention", "losses"):
    assert "transformer_jax.kernels" not in graph[f"transformer_jax.{name}"], name
  tree = ast.parse((PACKAGE / "model.py").read_text())
  uses = {fn.name for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
          for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id == "kernels"}
  assert uses == {"feed_forward"}, uses


def test_the_exports_are_mappings_and_steps_know_nothing_of_decoding():
  graph = import_graph()
  for mapping in ("marian", "ctranslate2_export"):
    for upper in ("evaluate", "runs", "trainer", "steps", "export", "cli"):
      assert not any(m == f"transformer_jax.{upper}" or m.startswith(f"transformer_jax.{upper}.")
                     for m in graph[f"transformer_jax.{mapping}"]), (mapping, upper)
  assert not graph["transformer_jax.steps"] & {"transformer_jax.decode", "transformer_jax.translation"}


def module_constants(path: pathlib.Path) -> dict[str, str]:
  """A module's top-level UPPER_CASE names and the source of their values."""
  found = {}
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Assign):
      for target in node.targets:
        if isinstance(target, ast.Name) and target.id.lstrip("_").isupper():
          found[target.id] = ast.unparse(node.value)
  return found


def test_no_constant_or_choice_list_is_defined_twice():
  """Each named constant, and each tuple of choices, has one home (constants.py, config.py or
  the module it belongs to): no name defined in two modules, no tuple literal written twice."""
  names: dict[str, list[str]] = {}
  tuples: dict[str, list[str]] = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    for name, value in module_constants(path).items():
      names.setdefault(name, []).append(module_name(path))
      if value.startswith("(") and value.count(",") >= 1 and value.count("'") >= 4:
        tuples.setdefault(value, []).append(f"{module_name(path)}.{name}")
  # Two data sources map their own configs to language pairs: one name, two different tables.
  repeated = {k: v for k, v in names.items() if len(v) > 1 and k != "PAIRS"}
  assert not repeated, repeated
  assert not {k: v for k, v in tuples.items() if len(v) > 1}
