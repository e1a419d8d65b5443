"""The house rules of docs/architecture.md, read off the source: what each package may import, no import circles,
text recipes apart from each other. Every import counts, at module top or inside a function."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# package → the packages it may import (besides itself); the engine imports nothing above it
ALLOWED = {
    "errors": set(),
    "loading": {"errors"},
    "medstate": {"errors"},  # medstate/__init__.py
    "ssm": {"errors", "loading"},
    "train": {"errors", "loading"},
    "data": {"medstate", "errors", "loading"},
    "eval": {"errors", "loading"},
    "ehr": {"data", "errors", "eval", "loading", "ssm", "train"},
    "interp": {"ehr", "errors", "loading", "ssm"},
    "text": {"data", "errors", "eval", "loading", "ssm", "train"},
    "vision": {"errors", "eval", "loading", "ssm", "train"},
    "serve": {"data", "ehr", "errors", "interp", "loading", "ssm"},
    "cli": {
        "medstate",
        "data",
        "ehr",
        "errors",
        "eval",
        "interp",
        "loading",
        "serve",
        "ssm",
        "text",
        "train",
        "vision",
    },
}
TEXT_RECIPES = ("biomed", "notes", "summarise")


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "medstate").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module → the medstate modules it imports (`from a import b` counts as a.b when b is a module)."""
    edges = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [s for s in subs if s in modules] or [base]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        edges[name] = found
    return edges


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "medstate"


EDGES = _imports(_modules())


def test_the_rule_reader_sees_imports():
    # an oracle for the reader itself: known arrows of the code base
    assert "medstate.ssm.model" in EDGES["medstate.ssm"]
    assert "medstate.ssm.checkpoint" in EDGES["medstate.ssm.model"]
    assert "medstate.text.runs" in EDGES["medstate.text.biomed.sft"]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_downward(package):
    wrong = sorted(
        f"{module} → {target}"
        for module, targets in EDGES.items()
        if _package(module) == package
        for target in targets
        if _package(target) != package and _package(target) not in ALLOWED[package]
    )
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: {wrong}"


def test_every_package_has_a_rule():
    assert {_package(m) for m in EDGES} <= set(ALLOWED)


def test_no_import_circles():
    seen, on_path, circles = set(), [], []

    def visit(module):
        if module in on_path:
            circles.append([*on_path[on_path.index(module) :], module])
            return
        if module in seen:
            return
        seen.add(module)
        on_path.append(module)
        for target in sorted(EDGES[module]):
            visit(target)
        on_path.pop()

    for module in sorted(EDGES):
        visit(module)
    assert not circles, " ; ".join(" → ".join(c) for c in circles)


def test_text_recipes_import_the_core_never_each_other():
    def recipe(module):
        parts = module.split(".")
        return parts[2] if len(parts) > 3 and parts[1] == "text" and parts[2] in TEXT_RECIPES else None

    wrong = [
        f"{module} → {target}"
        for module, targets in EDGES.items()
        if module.startswith("medstate.text")
        for target in targets
        if target.startswith("medstate.text") and recipe(target) is not None and recipe(target) != recipe(module)
    ]
    assert not wrong, f"a recipe imports another recipe, or the core imports a recipe: {wrong}"
