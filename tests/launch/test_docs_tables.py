"""The docs' tables against their sources: every table between `<!-- table: NAME -->` markers is
what `launch/bench/tables.py` renders from the committed results JSON (measured figures) or from
the code (parameters, GFLOPs, bytes, trainable parameters)."""

from __future__ import annotations

import json
import re

import pytest

from launch.bench import tables
from launch.bench._tables import measured
from tests.conftest import REPO


def marked_tables() -> list[tuple[str, str]]:
    return [
        (doc, found.group(2))
        for doc in tables.DOCS
        for found in tables.MARKED.finditer((REPO / doc).read_text())
    ]


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return {}


@pytest.mark.parametrize(("doc", "name"), marked_tables())
def test_the_marked_table_is_what_its_source_renders(doc, name, rendered):
    text = (REPO / doc).read_text()
    block = next(f.group(0) for f in tables.MARKED.finditer(text) if f.group(2) == name)
    assert tables.render(block, rendered, doc) == block, (
        f"{doc}: table {name} differs from its source; run python launch/bench/tables.py"
    )


def test_every_table_is_published_once_per_doc():
    marked = marked_tables()
    assert {name for _, name in marked} == set(tables.TABLES)
    assert len(marked) == len(set(marked))


def test_every_results_file_has_a_table_and_records_how_it_was_made():
    files = {p.stem for p in tables.RESULTS.glob("*.json")}
    assert files == set(tables.MEASURED.values())
    for name in files:
        data = json.loads((tables.RESULTS / f"{name}.json").read_text())
        script = data["command"].split()[1]
        assert data["command"].startswith("python launch/bench/"), name
        assert (REPO / script).is_file(), f"{name}: {script} is not in the repository"
        assert f" launch/bench/results/{name}.json" in data["command"], name  # --out or --results
        assert data["machine"]["torch"] and re.match(r"\d{4}-\d\d-\d\d", data["date"]), name


def miou(all_: float, small: float, medium: float, large: float) -> dict[str, float]:
    return {"all": all_, "small": small, "medium": medium, "large": large}


SAM_MINI = {  # as launch/bench/reference_teacher.py writes it
    "command": "python launch/bench/reference_teacher.py",
    "date": "2026-12-07 10:00:00 UTC",
    "machine": {"processor": "x86_64", "cpu_count": 2, "torch_threads": 2, "torch": "2.15"},
    "held_images": 200,
    "num_instances": 1234,
    "box_miou": miou(71.25, 50.0, 70.0, 80.0),
    "box_fill_miou": miou(40.0, 30.0, 40.0, 45.0),
    "box_single_mask_miou": miou(65.0, 45.0, 64.0, 75.0),
    "point_1click_miou": miou(55.0, 35.0, 50.0, 66.0),
}


def test_the_reference_teacher_table_reads_its_file_when_present(tmp_path, monkeypatch):
    monkeypatch.setattr(measured, "SAM_MINI_RESULTS", tmp_path / "sam_mini.json")
    assert tables.sam_mini_table() == ""  # absent: an empty block
    (tmp_path / "sam_mini.json").write_text(json.dumps(SAM_MINI))
    text = tables.sam_mini_table()
    assert text.startswith("200 held-out scenes, 1,234 instances. `python launch/bench/")
    assert "| prompt | mIoU all | mIoU small | mIoU medium | mIoU large |" in text
    assert "| GT box (best of 3 masks by predicted IoU) | 71.2 | 50.0 | 70.0 | 80.0 |" in text
    assert "| 1 click | 55.0 | 35.0 | 50.0 | 66.0 |" in text
    assert text.endswith(
        "| box-fill baseline (the box itself as the mask) | 40.0 | 30.0 | 40.0 | 45.0 |\n"
    )
    stale = "<!-- table: sam_mini -->\n<!-- /table -->"
    assert tables.render(stale, {}) == f"<!-- table: sam_mini -->\n{text}<!-- /table -->"


def test_an_unknown_table_is_named():
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        tables.render("<!-- table: nope -->\n<!-- /table -->", {}, "X.md")
