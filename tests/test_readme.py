"""The README and the folder docs: the two commands the README opens with, its length, its
students table against the registry, links that resolve, and no pointer at notes that live
outside the repository."""

from __future__ import annotations

import re
import subprocess

import pytest

from launch.bench.speed import count_gflops
from students import build_student, list_students
from tests.conftest import REPO

COMMANDS = (
    "bash launch/setup_env.sh && .venv/bin/python launch/demo.py"
    "                          # the CPU demo",
    "bash launch/setup_env.sh --slurm && .venv/bin/ruff check . && .venv/bin/python -m pytest"
    "   # the tests",
)


def repo_files() -> list[str]:
    """The repository's files, committed or not (ignored ones left out)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return sorted(name for name in set(listed) if (REPO / name).is_file())


DOCS = [name for name in repo_files() if name.endswith("README.md")]
ROW = re.compile(
    r"^\| `(dfa_\w+)`[^|]*\| (\d+) / (\d+) / (\d+) \((\d+)\) \| ([\d.]+) M \| ([\d.]+) \|$"
)
# A path into the design notes kept beside the repository (written split, so that this file
# does not match itself).
NOTES = re.compile("refer" + r"ence/\w+\.md")


def readme() -> str:
    return (REPO / "README.md").read_text()


def test_the_readme_opens_with_what_it_does_and_the_two_commands():
    lines = readme().splitlines()
    fence = lines.index("```bash")
    assert lines[fence + 1 : fence + 3] == list(COMMANDS)
    assert "distills Segment Anything" in " ".join(lines[:fence])
    assert not any(line.startswith("## ") for line in lines[:fence])


def test_the_readme_is_read_in_one_sitting():
    assert len(readme().splitlines()) <= 300
    assert "meaningless" not in readme().lower()


def students_table() -> dict[str, tuple[int, ...] | tuple[float, ...]]:
    rows = {}
    for line in readme().splitlines():
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


def anchors(path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_of_the_docs_resolves(doc):
    path = REPO / doc
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", path.read_text()):
        if "://" in target:
            continue
        linked = path.parent / target if target else path
        assert linked.exists(), f"{doc}: {target} does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{doc}: no heading #{anchor} in {target or doc}"


def test_the_readme_links_every_folder_doc():
    for doc in DOCS:
        if doc != "README.md":
            assert f"]({doc})" in readme(), doc


def test_no_file_points_at_notes_outside_the_repository():
    found = []
    for name in repo_files():
        path = REPO / name
        if path.suffix in {".py", ".md", ".sh", ".sbatch", ".toml", ".yaml", ".txt", ".cfg"}:
            found += [f"{name}: {m}" for m in NOTES.findall(path.read_text(errors="replace"))]
    assert not found, "cite the paper or the upstream repository instead:\n" + "\n".join(found)
