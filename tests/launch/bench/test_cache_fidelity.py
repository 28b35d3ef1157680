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
    settings = dict(train_images=8, held_images=2, steps=3, batch_size=4, tokens=32, seeds=2)
    return work, run_child("launch.bench.cache_fidelity:arm", work=str(work), **settings)


def test_every_arm_ran_at_the_stated_scale(bench):
    work, result = bench
    assert result["scale"]["reduction"] == "tokens=32" and result["scale"]["steps"] == 3
    for arm in ARMS:
        for run in (arm, f"{arm}_seed1"):
            rows = (work / run / "log.csv").read_text().splitlines()
            assert len(rows) == 1 + 3  # header and one row a step: equal steps
    logs = {arm: (work / arm / "log.csv").read_text().splitlines()[0] for arm in ARMS}
    assert "loss_block2" in logs["reduced"] and "loss_block5" in logs["full"]
    # the reduced cache holds fewer bytes: 32 of 1,024 tokens of each tap
    assert result["cache_bytes"]["reduced"] < result["cache_bytes"]["full"]
    manifest = json.loads((work / "cache_reduced" / "manifest.json").read_text())
    assert manifest["reduction"] == "tokens=32"
    # the projection alternative at the same bytes (32 of 1,024 tokens): 4 of 128 channels
    pca = result["pca_retained"]
    assert (pca["channels_kept"], pca["of"]) == (4, 128)
    assert all(0 < pca[tap] < 1 for tap in ("block2", "block5"))


def _records(work, run):
    lines = (work / f"eval_{run}.json.instances.jsonl").read_text().splitlines()
    return {r["id"]: r for r in map(json.loads, lines)}


def test_paired_figures_are_the_per_instance_differences(bench):
    work, result = bench
    # per instance, GT IoU averaged over the two seeds of each arm
    gt = {
        arm: {
            k: 50 * (r["iou"][0] + _records(work, f"{arm}_seed1")[k]["iou"][0])
            for k, r in _records(work, arm).items()
        }
        for arm in ARMS
    }
    for new, base in COMPARISONS:
        diffs = [gt[new][k] - gt[base][k] for k in gt[base]]
        got = result[f"{new} - {base}"]["gt_iou"]
        assert got["n"] == len(diffs) == result["scale"]["num_instances"] > 0
        assert got["mean"] == pytest.approx(statistics.fmean(diffs))
        assert statistics.fmean(got["by_seed"]) == pytest.approx(got["mean"])
    assert result["gt_iou"]["full"] == pytest.approx(statistics.fmean(gt["full"].values()))
    first, second = _records(work, "full"), _records(work, "full_seed1")
    between = [100 * (second[k]["agreement"][0] - first[k]["agreement"][0]) for k in first]
    got = result["seed 1 - seed 0"]["full"]["agreement"]["mean"]
    assert got == pytest.approx(statistics.fmean(between))


def test_the_docs_table_holds_the_figures(bench):
    _, result = bench
    table = result["tables"]["fidelity"]
    assert table["header"] == ["student", "GT mIoU", "teacher agreement"]
    seeds = result["gt_iou_by_seed"]["full"]
    assert table["rows"][0][:2] == [
        "whole taps",
        f"{result['gt_iou']['full']:.1f} ({seeds[0]:.1f}, {seeds[1]:.1f})",
    ]
    d = result["reduced - full"]["gt_iou"]
    assert table["rows"][3][1].startswith(f"{d['mean']:+.2f} +- {d['se']:.2f} (")
    assert table["rows"][-1][0] == "final embedding only: seed 1 - seed 0"
