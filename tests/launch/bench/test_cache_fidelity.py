"""The cache-fidelity benchmark (`launch/bench/cache_fidelity.py`) at a tiny scale: every arm is
distilled and scored, and the paired figures are the per-instance differences they pair; the
docs table is made from them."""

import json
import statistics

import pytest

from launch.bench.cache_fidelity import ARMS, COMPARISONS
from launch.bench.common import run_child

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The arm as a claims benchmark runs it: in a child process, the figures as JSON."""
    work = tmp_path_factory.mktemp("fidelity")
    settings = dict(train_images=8, held_images=2, steps=3, batch_size=4, tokens=32)
    return work, run_child("launch.bench.cache_fidelity:arm", work=str(work), **settings)


def test_every_arm_ran_at_the_stated_scale(bench):
    work, result = bench
    assert result["scale"]["reduction"] == "tokens=32" and result["scale"]["steps"] == 3
    for arm in ARMS:
        rows = (work / arm / "log.csv").read_text().splitlines()
        assert len(rows) == 1 + 3  # header and one row a step: equal steps
    logs = {arm: (work / arm / "log.csv").read_text().splitlines()[0] for arm in ARMS}
    assert "loss_block2" in logs["reduced"] and "loss_block5" in logs["full"]
    # the reduced cache holds fewer bytes: 32 of 1,024 tokens of each tap
    assert result["cache_bytes"]["reduced"] < result["cache_bytes"]["full"]
    manifest = json.loads((work / "cache_reduced" / "manifest.json").read_text())
    assert manifest["reduction"] == "tokens=32"


def test_paired_figures_are_the_per_instance_differences(bench):
    work, result = bench
    records = {}
    for arm in ARMS:
        lines = (work / f"eval_{arm}.json.instances.jsonl").read_text().splitlines()
        records[arm] = {r["id"]: r for r in map(json.loads, lines)}
    for new, base in COMPARISONS:
        diffs = [
            100 * (records[new][i]["iou"][0] - records[base][i]["iou"][0]) for i in records[base]
        ]
        got = result[f"{new} - {base}"]["gt_iou"]
        assert got["n"] == len(diffs) == result["scale"]["num_instances"] > 0
        assert got["mean"] == pytest.approx(statistics.fmean(diffs))
    gt_full = [100 * r["iou"][0] for r in records["full"].values()]
    assert result["gt_miou"]["full"] == pytest.approx(statistics.fmean(gt_full))


def test_the_docs_table_holds_the_figures(bench):
    _, result = bench
    table = result["tables"]["fidelity"]
    assert table["header"] == ["student", "GT mIoU", "teacher agreement"]
    assert table["rows"][0] == [
        "whole taps",
        f"{result['gt_miou']['full']:.1f}",
        f"{result['agreement']['full']:.1f}",
    ]
    d = result["reduced - full"]["gt_iou"]
    assert table["rows"][3][1] == f"{d['mean']:+.2f} +- {d['se']:.2f}"
