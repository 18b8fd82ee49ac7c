"""The package's layers import only downward, and no group of modules imports itself in a loop.

Imports are read from the source (``ast``), at every depth: an import inside a function counts
like one at the top of the file, and so does a module name handed to ``importlib.import_module``
(a string literal equal to a module of the package, in a file that calls ``import_module``).
The layers and which module belongs to which are those of ``docs/architecture.md``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rcnn_lab"

# Lowest first; a module may import its own layer and the layers before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("rcnn_lab.errors", "rcnn_lab._check", "rcnn_lab._version")),
    ("config", ("rcnn_lab.config",)),
    ("registry", ("rcnn_lab.registry", "rcnn_lab.plugins")),
    ("components", ("rcnn_lab.models", "rcnn_lab.data", "rcnn_lab.ops")),
    ("engine", ("rcnn_lab.engine", "rcnn_lab.components", "rcnn_lab.probe")),
    ("runner", ("rcnn_lab.runner",)),
    ("search", ("rcnn_lab.search",)),
    ("report", ("rcnn_lab.report",)),
    ("cli", ("rcnn_lab.cli", "rcnn_lab.__main__", "rcnn_lab")),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` of the longest prefix naming ``module``."""
    best, length = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = i, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer; add it to LAYERS and docs/architecture.md")
    return best


def _resolve(target: str, known: dict[str, Path]) -> str | None:
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules ``module`` imports (at any depth, including by ``importlib.import_module``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    dynamic = any(isinstance(n, (ast.Name, ast.Attribute)) and getattr(n, "id", getattr(n, "attr", None)) == "import_module"
                  for n in ast.walk(tree))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif dynamic and isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            names = [node.value]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "rcnn_lab":
                target = _resolve(name, known)
                if target is not None and target != module:
                    out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
                  for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The parser sees late imports and ``import_module`` names; the checks flag upward edges and loops."""
    source = tmp_path / "m.py"
    source.write_text("import importlib\n\ndef f():\n    from rcnn_lab.runner import plan  # late\n"
                      "    importlib.import_module('rcnn_lab.cli.main')\n")
    known = modules()
    seen = imports("rcnn_lab.config.m", source, known)
    assert seen == {"rcnn_lab.runner.plan", "rcnn_lab.cli.main"}
    graph = {"rcnn_lab.config.m": seen, "rcnn_lab.runner.plan": {"rcnn_lab.config.m"}}
    assert len(upward_imports(graph)) == 2
    assert cycles(graph) == [["rcnn_lab.config.m", "rcnn_lab.runner.plan"]]
