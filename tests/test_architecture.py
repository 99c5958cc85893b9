"""The architecture of docs/architecture.md, checked on the source: the imports of ``src/app`` (parsed with ``ast``,
function-level imports included) form no cycle, the stages and the pipeline never import tracking, nothing below
the stages imports a stage, the pipeline or anything above, the science code keeps its imports of the app at the top
of its modules, and no module is over 500 lines.

Private framework use (Hydra's ``_internal``, ``Study.ask`` replaced, ...) is not checked here: the shared tool
``python ../shared/tools/structure.py --list`` already reports it, and a second copy of that check would drift.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 500
# Modules over MAX_LINES that another change of issue 18 is rewriting (the MLflow helper shrinks to <= 250 lines).
BEING_SPLIT: set[str] = set()
# The layers, bottom to top (docs/architecture.md). A module may import its own layer and those below.
LAYERS = (
    ("app", "app.errors", "app.config", "app.domain", "app.toy", "app.ml", "app.store"),
    ("app.evaluation",),
    ("app.stages",),
    ("app.pipeline",),
    ("app.tracking", "app.sweeps", "app.main", "app.workflow", "app.__main__"),
)
# Every module's dependencies on the rest of the app stay visible at its top; the only imports inside a function are
# those that keep a heavy import off a path that must stay light: the entry point imports the pipeline (torch,
# MadMiner) only when a job runs, not for --help / --cfg; the model registry module imports MLflow at its top.
LAZY_ALLOWED = {("app.main", "app.pipeline"), ("app.tracking.calls", "app.tracking.registry"),
                ("app.tracking.results", "app.tracking.registry")}


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_name(p): p for p in sorted((SRC / "app").rglob("*.py"))}


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _layer(name: str) -> int:
    """The layer of a module: the one of its longest matching prefix."""
    matches = [(len(p), i) for i, layer in enumerate(LAYERS) for p in layer if _within(name, (p,))]
    return max(matches)[1]


def _imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported app module, line, at module level) for every import of an app module in ``name``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # ``from app.ml import device`` imports the module app.ml.device; ``from app.ml.device import use`` not
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target in MODULES and target != name:
                found.append((target, node.lineno, id(node) not in nested))
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in {t for t, _, _ in GRAPH[v]}:
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
                components.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return components


def _violations(importers, forbidden) -> list[str]:
    return [f"{MODULES[m].relative_to(SRC)}:{line} imports {t}" for m in GRAPH if _within(m, importers)
            for t, line, _ in GRAPH[m] if _within(t, forbidden)]  # fmt: skip


def test_the_parser_sees_the_imports_it_must():
    """Not vacuous: known edges are found, at module level or inside a function."""
    stage = {t: top for t, _, top in GRAPH["app.stages.evaluate"]}
    assert stage["app.evaluation.limits"] and stage["app.ml.device"] and stage["app.store.files"]
    assert ("app.pipeline", False) in {(t, top) for t, _, top in GRAPH["app.main"]}  # main imports it lazily
    assert "app.ml.madminer_patches" in {t for t, _, _ in GRAPH["app"]}  # the package's __init__ counts too
    assert len(MODULES) > 40


def test_no_import_cycle():
    assert _cycles() == []


def test_stages_and_pipeline_never_import_tracking():
    assert _violations(("app.stages", "app.pipeline"), ("app.tracking",)) == []


def test_no_module_imports_a_layer_above_its_own():
    """Nothing below the stages imports a stage, the pipeline, tracking or an entry point; the stages import no
    pipeline; the pipeline no entry point."""
    upward = [f"{MODULES[m].relative_to(SRC)}:{line} imports {t}" for m in GRAPH for t, line, _ in GRAPH[m]
              if _layer(t) > _layer(m)]  # fmt: skip
    assert upward == []
    assert _layer("app.evaluation.limits") == 1 and _layer("app.__main__") == 4 and _layer("app.ml.device") == 0


def test_every_module_imports_the_app_at_its_top():
    hidden = [f"{MODULES[m].relative_to(SRC)}:{line} imports {t} inside a function" for m in GRAPH
              for t, line, top in GRAPH[m] if not top and (m, t) not in LAZY_ALLOWED]  # fmt: skip
    assert hidden == []


def test_no_module_over_500_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert max(sizes.values()) > 300  # not vacuous: the lines are counted
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES and name not in BEING_SPLIT}
    assert too_long == {}, "split these modules by job"


def test_no_private_framework_use():
    """The shared structure tool (beside the checkout, as in CI) finds no private use of Hydra, MLflow, Optuna,
    joblib, submitit, SQLAlchemy or CPython, and no cycle, in src/."""
    import subprocess
    import sys

    tool = SRC.parents[1] / "shared" / "tools" / "structure.py"
    if not tool.exists():
        pytest.skip(f"{tool} not available (needs ../shared beside the checkout)")
    out = subprocess.run([sys.executable, str(tool), "--list"], cwd=SRC.parent, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "private framework uses 0 " in out.stdout and "import cycles 0 " in out.stdout, out.stdout
