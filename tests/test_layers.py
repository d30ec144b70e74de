"""The package is layered: every module imports only its own layer and those below, with no cycles.

The layers, bottom to top (docs/architecture.md draws them):
  core < data < backbone < decoding < model < jobs < recipes < commands < the top (diffusionvl/__init__, __main__,
  cli). Imports inside functions count (they are still dependencies), and so does the facade: no module below the
  top imports `diffusionvl` itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import diffusionvl

PACKAGE = Path(diffusionvl.__file__).resolve().parent
LAYERS = ["core", "data", "backbone", "decoding", "model", "jobs", "recipes", "commands"]
TOP = len(LAYERS)  # diffusionvl/__init__.py, __main__.py, cli.py


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "__main__"):
        return TOP
    assert parts[1] in LAYERS, f"{module} is in no layer: put it in one of {LAYERS} (and say so in architecture.md)"
    return LAYERS.index(parts[1])


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """Every diffusionvl module `module` imports, wherever the import statement is."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in map(_resolve, targets) if t and t.startswith("diffusionvl") and t != module}
    return found


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_no_upward_imports():
    upward = sorted(f"{m} ({LAYERS[layer(m)] if layer(m) < TOP else 'top'}) imports {t} "
                    f"({LAYERS[layer(t)] if layer(t) < TOP else 'top'})"
                    for m, targets in GRAPH.items() for t in targets if layer(t) > layer(m))
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, cycles


def test_the_checker_sees_imports_inside_functions(tmp_path):
    assert "diffusionvl.model.conversion" in GRAPH["diffusionvl.jobs.train.trainer"]  # imported inside a function
    assert "diffusionvl.commands.train" not in GRAPH["diffusionvl.cli"]  # the CLI names commands by string only


def test_docs_and_code_cite_nothing_outside_the_repository():
    """Every contract the code relies on is stated in the repository (docs/design.md, module docstrings)."""
    root = PACKAGE.parents[1]
    outside = ["DESIGN" + ".md", "STYLE" + ".md", "../" + "shared", "DESIGN" + " invariant", "STYLE" + " rule"]
    files = [*root.glob("docs/*.md"), root / "README.md", *PACKAGE.rglob("*.py"), *root.glob("tests/*.py")]
    cited = sorted(f"{p.relative_to(root)}: {s}" for p in files for s in outside if s in p.read_text())
    assert not cited, cited
