"""The package's imports run one way, down (configs -> train -> tasks -> models/layers -> ops ->
update -> bases): no module reaches, even from inside a function, a module that reaches it.

The graph is read from the source (an AST scan), not from `sys.modules`, so an import inside a
function counts as much as one at the top. Nodes are the modules of randlora_jax, a package's
``__init__`` being its own node. ``import a.b.c`` is an edge to ``a.b.c`` (or to the longest
prefix that is a module); ``from a.b import c`` is an edge to ``a.b`` AND, when ``a.b.c`` is
a module, to ``a.b.c`` (the statement reads ``a.b``'s namespace).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "randlora_jax"
# Top-level code that is not the library: the library never imports it.
OUTSIDE = ("bench", "configs", "tests", "tests_clients", "examples", "train")


def module_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py file of the package under `root`."""
  out = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _longest_module(name: str, modules) -> str | None:
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def imported_names(module: str, path: pathlib.Path, modules) -> tuple[set[str], set[str]]:
  """(edges to package modules, every absolute dotted name imported) of one file."""
  is_package = path.name == "__init__.py"
  edges, names = set(), set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        names.add(alias.name)
        target = _longest_module(alias.name, modules)
        if target:
          edges.add(target)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolved against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ""
      names.add(source)
      target = _longest_module(source, modules)
      if target:
        edges.add(target)
      for alias in node.names:
        if f"{source}.{alias.name}" in modules:
          edges.add(f"{source}.{alias.name}")
  edges.discard(module)
  return edges, names


def import_graph(root: pathlib.Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
  """(module -> package modules it imports, module -> every dotted name it imports)."""
  modules = module_files(root)
  graph, names = {}, {}
  for module, path in modules.items():
    graph[module], names[module] = imported_names(module, path, modules)
  return graph, names


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Each strongly connected component of more than one module, as one closed path through
  it (a -> b -> ... -> a), so the failure names the imports to undo."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):  # Tarjan's algorithm; the package is small enough for recursion
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(_closed_path(graph, set(component)))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def _closed_path(graph, component: set[str]) -> list[str]:
  """A shortest cycle through the component's first module (breadth-first)."""
  start = min(component)
  parents, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v] & component):
        if w == start:
          path = [v]
          while parents[path[-1]] is not None:
            path.append(parents[path[-1]])
          return [start] + path[::-1][1:] + [start] if v != start else [start, start]
        if w not in parents:
          parents[w] = v
          nxt.append(w)
    frontier = nxt
  return sorted(component)


def _under(module: str, *prefixes: str) -> bool:
  return any(module == p or module.startswith(p + ".") for p in prefixes)


def reachable(graph, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for w in graph[todo.pop()]:
      if w not in seen:
        seen.add(w)
        todo.append(w)
  return seen


GRAPH, NAMES = import_graph()
P = PACKAGE + "."


def test_the_scan_sees_the_package_and_its_imports():
  # The scan is only as good as what it reads: the core modules are there, with the edges
  # their source plainly has (a function-level one included), so an empty graph cannot pass.
  for module in (P + "bases", P + "ops", P + "tasks", P + "train.loop", P + "data"):
    assert module in GRAPH, module
  assert P + "bases" in GRAPH[P + "update"]
  assert P + "tasks" in GRAPH[P + "train.loop"]
  assert P + "models.loading" in GRAPH[P + "train.setup"]  # imported inside `build`
  assert sum(map(len, GRAPH.values())) > 150


def test_the_scan_finds_a_cycle_and_names_it(tmp_path):
  # The rules above on a made-up package: `from pkg import sub` inside a function of pkg.a,
  # whose __init__ imports pkg.a, is a circle through the package's __init__.
  pkg = tmp_path / PACKAGE / "pkg"
  pkg.mkdir(parents=True)
  (tmp_path / PACKAGE / "__init__.py").write_text("")
  (pkg / "__init__.py").write_text(f"from {PACKAGE}.pkg.a import f\n")
  (pkg / "a.py").write_text(f"def f():\n  from {PACKAGE}.pkg import b\n  return b\n")
  (pkg / "b.py").write_text("import os\n")
  (pkg / "c.py").write_text(f"import {PACKAGE}.pkg.b as b\n")
  graph, _ = import_graph(tmp_path)
  assert graph[P + "pkg.a"] == {P + "pkg", P + "pkg.b"}
  assert graph[P + "pkg.c"] == {P + "pkg.b"}
  assert cycles(graph) == [[P + "pkg", P + "pkg.a", P + "pkg"]]


def test_no_import_cycle():
  found = cycles(GRAPH)
  assert not found, "import cycles (undo one import of each): " + "; ".join(
      " -> ".join(c) for c in found)


# module -> everything it may reach through its own imports (the package's root __init__, which
# only names lazy exports, aside), why.
LEAVES = {
    P + "bases": (set(), "the hash and the distributions"),
    P + "update": ({P + "bases"}, "the one readable definition of the update, on the bases"),
    P + "tree": (set(), "the path helper every tree walker uses"),
    P + "errors": (set(), "the config error, below the task registry and the trainer"),
    P + "data.common": (set(), "the data error, below the pipeline and the builders"),
    P + "tasks": ({P + "errors"}, "the task registry the trainer reads: names, no task"),
}


@pytest.mark.parametrize("module", sorted(LEAVES))
def test_leaves_reach_only_what_they_may(module):
  assert not GRAPH[PACKAGE], GRAPH[PACKAGE]  # the root imports its exports lazily
  allowed, why = LEAVES[module]
  extra = reachable(GRAPH, module) - allowed - {PACKAGE}
  assert not extra, f"{module} ({why}) reaches {sorted(extra)}"


# (module prefix, what it must not reach through its own imports, why)
LAYERS = [
    (P + "kernels", (P + "ops", P + "layers", P + "linen", P + "nnx", P + "inject",
                     P + "models", P + "tasks", P + "train"),
     "kernels use the leaf math, never the op that dispatches to them"),
    (P + "ops", (P + "layers", P + "linen", P + "nnx", P + "inject", P + "lora", P + "methods",
                 P + "models", P + "tasks", P + "train"),
     "the differentiable op: below the layers that call it"),
    (P + "models", (P + "tasks", P + "train"), "models know no task and no trainer"),
    (P + "data", (P + "models", P + "tasks", P + "train"), "input: below models and tasks"),
    (P + "tasks", (P + "train.loop", P + "train.vl_sweep", P + "train.demo", P + "aot"),
     "a task is driven by the trainer's top, never the reverse"),
]


@pytest.mark.parametrize("module,forbidden,why", LAYERS, ids=[r[0] for r in LAYERS])
def test_layer_order(module, forbidden, why):
  bad = {}
  for m in GRAPH:
    if not _under(m, module):
      continue
    for w in reachable(GRAPH, m):
      if any(_under(w, f) for f in forbidden) and not _under(w, module):
        bad.setdefault(m, []).append(w)
  assert not bad, f"{module} ({why}) reaches: {dict(sorted(bad.items()))}"


def test_trainer_pieces_read_only_the_task_registry():
  # The trainer's pieces that tasks build on (setup, step, validate, ...) read the task
  # registry's names (randlora_jax.tasks) but no task module: only the trainer's top does.
  top = {P + "train.loop", P + "train.vl_sweep", P + "train.demo"}
  for m in GRAPH:
    if _under(m, P + "train") and m not in top:
      tasks = {w for w in GRAPH[m] if _under(w, P + "tasks") and w != P + "tasks"}
      assert not tasks, f"{m} imports task modules {sorted(tasks)}"


def test_the_library_never_imports_what_sits_on_top_of_it():
  bad = {m: sorted(n for n in names if n.split(".")[0] in OUTSIDE)
         for m, names in NAMES.items()}
  assert not {m: n for m, n in bad.items() if n}, bad


def test_dense_factory_has_one_home():
  # `randlora_jax.methods.dense_factory` is the factory; the old lazy alias on `lora` is gone.
  from randlora_jax import lora, methods
  assert callable(methods.dense_factory)
  assert not hasattr(lora, "dense_factory")
