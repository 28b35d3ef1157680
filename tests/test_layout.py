"""The house rules that keep the code readable, checked over the source: function sizes and which
room may import which."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("distill", "teachers", "students", "eval", "launch", "tests")


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def functions(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    return [
        (node.end_lineno - node.lineno + 1, node.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def imported(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_function_is_over_100_lines_and_the_distillation_loop_is_under_50():
    long = [
        f"{p.relative_to(REPO)}:{name} ({n} lines)"
        for p in sources()
        for n, name in functions(p)
        if n > 100
    ]
    assert not long
    loop = max(functions(REPO / "distill" / "train.py"))
    assert loop[0] < 50, loop
    assert len(sources()) > 50  # the walk found the project


def test_rooms_import_only_what_they_may():
    def imports_of(pkg: str, skip: tuple[str, ...] = ()) -> dict[str, set[str]]:
        return {
            str(p.relative_to(REPO)): imported(p)
            for p in (REPO / pkg).rglob("*.py")
            if p.name not in skip
        }

    for path, names in imports_of("distill").items():
        # Of eval, only the leaf modules the adapt stage reads its data and scores with.
        evals = {n for n in names if n == "eval" or n.startswith("eval.")}
        assert evals <= {"eval.mask_data", "eval.mask_metrics"}, path
    for path, names in imports_of("eval", skip=("cli.py", "coco.py", "lvis.py")).items():
        assert "eval.cli" not in names, path
    for path, names in imports_of("teachers").items():
        assert not any(n.split(".")[0] in ("students", "eval", "distill") for n in names), path
    for path in (REPO / "teachers" / "runtime").rglob("*.py"):
        project = {n for n in imported(path) if n.split(".")[0] in PACKAGES}
        assert all(n.startswith("teachers.runtime") for n in project), path
