"""The package's layers: each module imports only its own layer and those below, without
circles; analysis and report never import models, collect or evaluate.

Every import is parsed, including those inside functions. An import under
``if TYPE_CHECKING:`` is held to the same rules unless ``TYPE_CHECKING_EXEMPT`` lists it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qvd_bench"

# Lowest first. A module belongs to the first entry whose prefix it starts with.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "qvd_bench.errors",
            "qvd_bench.config",
            "qvd_bench.registry",
            "qvd_bench.prompts",
            "qvd_bench.numerics",
            "qvd_bench.datasets",
            "qvd_bench.resources",
        ),
    ),
    ("store", ("qvd_bench.store",)),
    ("models", ("qvd_bench.models",)),
    ("collect", ("qvd_bench.collect",)),
    ("analysis", ("qvd_bench.analysis",)),
    ("quant", ("qvd_bench.quant",)),
    ("evaluate", ("qvd_bench.evaluate",)),
    ("report", ("qvd_bench.report",)),
    ("commands", ("qvd_bench.commands", "qvd_bench.__main__")),
)
# The public facade re-exports from every layer.
FACADE = "qvd_bench"
# Layers that read stored results only, never a live model or an evaluation.
READ_ONLY = {
    "analysis": {"models", "collect", "evaluate"},
    "report": {"models", "collect", "evaluate"},
}
# (importing module, imported module) pairs allowed under ``if TYPE_CHECKING:`` only.
TYPE_CHECKING_EXEMPT: set[tuple[str, str]] = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def package_imports(root: Path) -> dict[str, set[tuple[str, bool]]]:
    """Every module's imports of the package's own modules.

    Returns:
        module name -> {(imported module, under TYPE_CHECKING)}. ``from a import b`` counts
        as an import of ``a.b`` when that is a module, else of ``a``.
    """
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    top = root.name
    graph: dict[str, set[tuple[str, bool]]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[tuple[str, bool]] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        guarded: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in node.body:
                    guarded.update(id(n) for n in ast.walk(child))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    targets.append(full if full in modules else source)
            for target in targets:
                if target == top or target.startswith(top + "."):
                    while target not in modules and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target != name:
                        edges.add((target, id(node) in guarded))
        graph[name] = edges
    return graph


def layer_violations(root: Path) -> list[str]:
    """Imports against the layers, as readable lines."""
    problems = []
    for module, edges in sorted(package_imports(root).items()):
        if module == FACADE:
            continue
        here = layer_of(module)
        if here is None:
            problems.append(f"{module} belongs to no layer")
            continue
        for target, type_only in sorted(edges):
            if target == FACADE:
                problems.append(f"{module} imports the facade {FACADE}")
                continue
            there = layer_of(target)
            if there is None:
                continue
            if type_only and (module, target) in TYPE_CHECKING_EXEMPT:
                continue
            here_name, there_name = LAYERS[here][0], LAYERS[there][0]
            if there > here:
                problems.append(
                    f"{module} ({here_name}) imports {target} ({there_name}), a higher layer"
                )
            elif there_name in READ_ONLY.get(here_name, ()):
                problems.append(f"{module} ({here_name}) imports {target} ({there_name})")
    return problems


def import_cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: {t for t, _ in e} for m, e in package_imports(root).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_every_import_follows_the_layers():
    assert layer_violations(PACKAGE) == []


def test_no_import_cycles():
    assert import_cycles(PACKAGE) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "qvd_bench"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return root


@pytest.mark.parametrize(
    "statement",
    [
        "from qvd_bench.evaluate import fidelity",
        "import qvd_bench.evaluate.fidelity",
        "from ..evaluate import fidelity",
        "from qvd_bench import evaluate",
    ],
)
def test_a_backward_import_inside_a_function_is_found(tmp_path, statement):
    root = _tree(
        tmp_path,
        {
            "quant/apply.py": f"def f():\n    {statement}\n",
            "evaluate/fidelity.py": "",
        },
    )
    assert any("qvd_bench.quant.apply (quant) imports" in p for p in layer_violations(root))


def test_analysis_may_not_read_a_live_model(tmp_path):
    root = _tree(
        tmp_path, {"analysis/plan.py": "from qvd_bench.models import zoo\n", "models/zoo.py": ""}
    )
    assert layer_violations(root) == [
        "qvd_bench.analysis.plan (analysis) imports qvd_bench.models.zoo (models)"
    ]


def test_type_checking_imports_count_unless_listed(tmp_path):
    text = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qvd_bench.report import render\n"
    root = _tree(tmp_path, {"store.py": text, "report/render.py": ""})
    assert layer_violations(root) == [
        "qvd_bench.store (store) imports qvd_bench.report.render (report), a higher layer"
    ]


def test_a_cycle_within_a_layer_is_found(tmp_path):
    root = _tree(
        tmp_path,
        {
            "quant/a.py": "from qvd_bench.quant import b\n",
            "quant/b.py": "def f():\n    from qvd_bench.quant.a import x\n",
        },
    )
    assert import_cycles(root) == [["qvd_bench.quant.a", "qvd_bench.quant.b"]]
