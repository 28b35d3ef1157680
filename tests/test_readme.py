"""The README's figures that the code can check: the students table against the registry."""

from __future__ import annotations

import re

import pytest

from launch.bench.speed import count_gflops
from students import build_student, list_students
from tests.conftest import REPO

ROW = re.compile(
    r"^\| `(dfa_\w+)`[^|]*\| (\d+) / (\d+) / (\d+) \((\d+)\) \| ([\d.]+) M \| ([\d.]+) \|$"
)


def students_table() -> dict[str, tuple[int, ...] | tuple[float, ...]]:
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        if found := ROW.match(line):
            name, *ints, params, gflops = found.groups()
            rows[name] = (*map(int, ints), float(params), float(gflops))
    return rows


def test_the_students_table_lists_every_student():
    assert sorted(students_table()) == sorted(n for n in list_students() if n.startswith("dfa_"))


@pytest.mark.parametrize("name", sorted(students_table()))
def test_the_students_table_states_the_registry_figures(name):
    width, heads, depth, mlp_only, params, gflops = students_table()[name]
    student = build_student(name, img_size=1024)
    attention = [b.attn.num_heads for b in student.blocks if hasattr(b, "attn")]
    assert (student.embed_dim, set(attention), len(student.blocks)) == (width, {heads}, depth)
    assert len(student.blocks) - len(attention) == mlp_only
    assert sum(p.numel() for p in student.parameters()) / 1e6 == pytest.approx(params, abs=0.005)
    assert count_gflops(name, 1024) == pytest.approx(gflops, abs=0.05)


def test_the_results_table_gives_dfa_s_its_registry_parameter_count():
    line = next(
        x
        for x in (REPO / "README.md").read_text().splitlines()
        if x.startswith("| **dfa_s (ours)**")
    )
    params = float(line.split("|")[4])
    student = build_student("dfa_s", img_size=1024)
    assert sum(p.numel() for p in student.parameters()) / 1e6 == pytest.approx(params, abs=0.005)
