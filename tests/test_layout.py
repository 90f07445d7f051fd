"""The house rules of the package layout, read from the source (no imports run).

* **Doors.** A private module ``ntklayers.<pkg>._mod`` is imported only by modules
  inside ``ntklayers.<pkg>``; everything else goes through the package's
  ``__init__`` (``ntklayers._core`` is the kernel core's one door).
* **No cycles.** The module-level imports between ntklayers modules form no cycle.
* **No hidden imports.** An import of an ntklayers module inside a function is
  allowed only where it avoids an optional dependency (a framework adapter, the
  plotting module, ...), never core to core.
* **ARCHITECTURE.md** names every module of the package.
* **Size.** Every module has at most 400 lines.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ntklayers"

# Function-level imports of these modules are allowed: each needs an optional
# dependency (Haiku, Flax, matplotlib, optax, scikit-learn) that the importing
# module must not pull in at import time.
OPTIONAL = ("ntklayers.haiku", "ntklayers.flax", "ntklayers.plot", "ntklayers.optax",
            "ntklayers.nas", "ntklayers.cli._nas", "ntklayers._bench.zoo",
            "ntklayers.equinox")


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
  return MODULES.get(name, pathlib.Path()).name == "__init__.py"


def _imports(name: str, path: pathlib.Path):
  """``(imported module, line, inside a function)`` of every ntklayers import."""
  tree = ast.parse(path.read_text(), str(path))
  package = name if is_package(name) else name.rpartition(".")[0]
  functions = [n for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
  nested = {id(c) for f in functions for c in ast.walk(f) if c is not f}
  for node in ast.walk(tree):
    inside = id(node) in nested
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "ntklayers":
          yield alias.name, node.lineno, inside
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      if base.split(".")[0] != "ntklayers":
        continue
      for alias in node.names:
        full = f"{base}.{alias.name}"
        yield (full if full in MODULES else base), node.lineno, inside


IMPORTS = {name: list(_imports(name, path)) for name, path in MODULES.items()}


def _owner(target: str) -> str | None:
  """The package that must contain an importer of ``target``: the parent of the
  deepest private component of ``target`` (``None``: anyone may import it)."""
  parts = target.split(".")
  owner = None
  for k in range(1, len(parts)):
    if parts[k].startswith("_") and not parts[k].startswith("__"):
      owner = ".".join(parts[:k])
  return owner


def test_private_modules_are_imported_through_their_package_door():
  bad = []
  for name, imports in IMPORTS.items():
    for target, line, _ in imports:
      owner = _owner(target)
      if owner is None or name == owner or name.startswith(owner + "."):
        continue
      if is_package(target) and _owner(target) == target.rpartition(".")[0]:
        # A private package's door (``ntklayers._core``) may be imported by any
        # module of the package that holds it.
        if name.startswith(target.rpartition(".")[0] + "."):
          continue
      bad.append(f"{name}:{line} imports {target}")
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  graph = {name: {t for t, _, inside in imports if not inside and t in MODULES and t != name}
           for name, imports in IMPORTS.items()}
  state: dict[str, int] = {}
  stack: list[str] = []
  cycles = []

  def visit(node: str) -> None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node)
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_function_level_imports_only_avoid_optional_dependencies():
  bad = [f"{name}:{line} imports {target} inside a function"
         for name, imports in IMPORTS.items() for target, line, inside in imports
         if inside and not any(target == o or target.startswith(o + ".") for o in OPTIONAL)
         and target != "ntklayers"]
  core = [b for b in bad if b.startswith("ntklayers._core")]
  assert not core, "\n".join(core)
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_architecture_names_every_module(name):
  text = (ROOT / "ARCHITECTURE.md").read_text()
  path = MODULES[name].relative_to(ROOT).as_posix()
  assert path in text or f"`{name}`" in text, f"ARCHITECTURE.md does not name {path}"


def test_modules_are_at_most_400_lines():
  long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 400}
  assert not long, long


def test_the_core_imports_no_framework():
  frameworks = ("haiku", "flax", "equinox", "optax", "matplotlib", "sklearn")
  bad = []
  for name, path in MODULES.items():
    if not name.startswith("ntklayers._core") and not name.startswith("ntklayers._large"):
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
              [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      bad += [f"{name} imports {m}" for m in mods if m.split(".")[0] in frameworks]
  assert not bad, bad
