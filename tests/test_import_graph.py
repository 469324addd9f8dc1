"""The layers of the library, checked on its source: no import cycles (imports inside functions
and under TYPE_CHECKING count), and no module reaching into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("amber_jax", "pallas_kernels")


def _modules() -> dict[str, Path]:
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      out[name] = path
  return out


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
  """(module, imported name or None) for every import in the file, at any depth."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      out += [(alias.name, None) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        out.append((sub, None) if sub in modules else (node.module, alias.name))
  return [(m, n) for m, n in out if m.split(".")[0] in PACKAGES]


def _graph() -> dict[str, set[str]]:
  """module -> the project modules importing it executes. Importing a.b.c runs the package
  a.b's __init__ first, so that is an edge too, except from a module inside a.b (its package
  is already initialised when it runs); the root packages' __init__ (the public re-exports)
  are left out: every submodule import passes through them."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    deps = set()
    for target, _ in _imports(path, modules):
      parts = target.split(".")
      for i in range(2, len(parts) + 1):
        dep = ".".join(parts[:i])
        inside = name.startswith(dep + ".") and i < len(parts)
        if dep in modules and dep != name and not inside:
          deps.add(dep)
    graph[name] = deps
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
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
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  graph = _graph()
  assert len(graph) > 40  # the walk found the library
  cycles = _cycles(graph)
  assert not cycles, f"import cycles among project modules: {cycles}"


def test_no_private_names_imported_across_modules():
  modules = _modules()
  private = [
    f"{path.relative_to(ROOT)}: {target}.{name}"
    for path in modules.values()
    for target, name in _imports(path, modules)
    if name is not None and name.startswith("_") and name != "__version__"
  ]
  assert not private, f"private names imported from other modules: {private}"


def test_pure_maths_imports_no_model():
  """amber_jax.core (the maths of a site: scores, masks, quantization, the linear's steps)
  never imports the model, the plan, calibration, evaluation or runners."""
  modules = _modules()
  upper = ("amber_jax.model", "amber_jax.calibrate", "amber_jax.eval", "amber_jax.runs")
  bad = [
    f"{name} imports {target}"
    for name, path in modules.items()
    if name.startswith("amber_jax.core")
    for target, _ in _imports(path, modules)
    if target.startswith((*upper, "amber_jax.plan"))
  ]
  assert not bad, bad
