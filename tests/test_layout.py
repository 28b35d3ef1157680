"""The house rules that keep the code readable, checked over the source: function sizes, and which
room may import which (DESIGN.md, Rooms), with no exceptions.

The import graph has one node per module of the code (tests excluded) and an edge for every import
statement at any depth of a file: an import inside a function runs too, only later. Edges go to
the module named (`from students.export import save_student` -> `students.export`; `from teachers
import runtime` -> `teachers.runtime`, a module), never implicitly to the packages above it.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from tests.conftest import REPO

ROOMS = ("teachers", "students", "distill", "eval", "launch")
PACKAGES = (*ROOMS, "tests")
# The arrows run one way: teachers <- students <- {distill, eval} <- launch.
MUST_NOT_IMPORT = {
    "teachers": {"students", "distill", "eval", "launch"},
    "students": {"distill", "eval", "launch"},
    "distill": {"eval", "launch"},
    "eval": {"distill", "launch"},
}
GROUND_FLOOR = "teachers.runtime"
BENCH_WING, BENCH_HELPER = "launch.bench", "launch.bench.common"


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def functions(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    return [
        (node.end_lineno - node.lineno + 1, node.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def code_modules() -> dict[str, Path]:
    return {module_name(p): p for room in ROOMS for p in (REPO / room).rglob("*.py")}


def _known(name: str) -> str:
    """`name` or the nearest module above it that is a file of the code."""
    while name not in code_modules() and "." in name:
        name = name.rpartition(".")[0]
    return name


def imported_modules(path: Path) -> set[str]:
    """The modules of the code that `path` imports, at any depth of the file."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_known(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level - 1` steps above this one
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in code_modules() else _known(base))
    return {name for name in found if name.split(".")[0] in ROOMS} - {here}


@cache
def import_graph() -> dict[str, frozenset[str]]:
    return {name: frozenset(imported_modules(p)) for name, p in code_modules().items()}


def cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


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


def test_the_graph_sees_every_room_and_resolves_modules():
    graph = import_graph()
    assert {name.split(".")[0] for name in graph} == set(ROOMS)
    assert "students.export" in graph["distill.train"]  # from students.export import ...
    assert "teachers.runtime.preempt" in graph["distill.jobs"]
    assert "students" in graph["distill.train"]  # from students import build_student


def test_rooms_import_only_the_rooms_below_them():
    wrong = [
        f"{module} imports {name}"
        for module, names in import_graph().items()
        for name in sorted(names)
        if name.split(".")[0] in MUST_NOT_IMPORT.get(module.split(".")[0], ())
    ]
    assert not wrong


def test_the_ground_floor_imports_nothing_of_the_project():
    wrong = [
        f"{module} imports {name}"
        for module, names in import_graph().items()
        if module.startswith(GROUND_FLOOR)
        for name in sorted(names)
        if not name.startswith(GROUND_FLOOR)
    ]
    assert not wrong


def test_no_import_circles():
    circles = cycles(import_graph())
    assert not circles


def _bench_helper(module: str) -> bool:
    """The wing's shared helper: the package and its modules."""
    return module == BENCH_HELPER or module.startswith(f"{BENCH_HELPER}.")


def _own_parts(module: str, name: str) -> bool:
    """`name` is the private package of `module`'s benchmark: launch/bench/NAME.py and
    launch/bench/_NAME/ are one benchmark."""
    bench = module.split(".")[2].lstrip("_")
    return name == f"{BENCH_WING}._{bench}" or name.startswith(f"{BENCH_WING}._{bench}.")


def test_benchmarks_share_one_helper_and_import_nothing_of_one_another():
    graph = import_graph()
    wrong = [
        f"{module} imports {name}"
        for module, names in graph.items()
        if module.startswith(f"{BENCH_WING}.")
        for name in sorted(names)
        if name.split(".")[0] == "launch"
        and not _bench_helper(name)
        and not _own_parts(module, name)
    ]
    assert not wrong
    # the helper knows no benchmark: it imports only its own modules of the wing
    assert not [
        (m, n)
        for m, names in graph.items()
        if _bench_helper(m)
        for n in names
        if n.startswith(f"{BENCH_WING}.") and not _bench_helper(n)
    ]


def test_the_evaluation_core_does_not_import_its_command_line():
    entry_scripts = {"eval.cli", "eval.coco", "eval.lvis"}
    wrong = [
        module
        for module, names in import_graph().items()
        if module.startswith("eval.") and module not in entry_scripts and "eval.cli" in names
    ]
    assert not wrong


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset()}
    assert cycles(graph) == [["a", "b", "c"]]
