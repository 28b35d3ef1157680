"""The cache-fidelity benchmark (`launch/bench/cache_fidelity.py`) at a tiny scale: every arm is
distilled and scored, and the paired figures are the per-instance differences they pair; the
docs table is made from them."""

import json
import statistics

import pytest

from launch.bench.cache_fidelity import FidelityConfig, comparisons, run_name
from launch.bench.common import run_child

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The arm as a claims benchmark runs it: in a child process, the figures as JSON."""
    work = tmp_path_factory.mktemp("fidelity")
    settings = dict(train_images=8, held_images=2, steps=3, batch_size=4, seeds=2, jobs=2)
    settings["settings"] = SETTINGS
    return work, run_child("launch.bench.cache_fidelity:arm", work=str(work), **settings)


SETTINGS = "embed=fp16,blocks=int8:tokens=32; int8:tokens=32"
MIXED32, INT8 = "embed=fp16,blocks=int8, tokens=32", "int8, tokens=32"
ARMS = ["full", MIXED32, INT8, "final_only"]


def test_every_arm_ran_at_the_stated_scale(bench):
    work, result = bench
    assert list(result["arms"]) == ARMS and result["scale"]["steps"] == 3
    for arm in ARMS:
        for run in (run_name(arm, 0), run_name(arm, 1)):
            rows = (work / run / "log.csv").read_text().splitlines()
            assert len(rows) == 1 + 3  # header and one row a step: equal steps
    logs = {a: (work / run_name(a, 0) / "log.csv").read_text().splitlines()[0] for a in ARMS}
    assert "loss_block2" in logs[INT8] and "loss_block5" in logs["full"]
    # reduced caches hold fewer bytes (32 of 1,024 tokens of each tap), an int8 embedding fewer
    bytes_ = result["cache_bytes"]
    assert bytes_[INT8] < bytes_[MIXED32] < bytes_["full"]
    manifest = json.loads((work / "cache_int8_tokens_32" / "manifest.json").read_text())
    assert manifest["reduction"] == "tokens=32" and manifest["codecs"]["embed"] == "int8"
    # ViT-H bytes from the shapes: 128 of 4,096 tokens, the share 32 of 1,024 keeps
    vit_h = result["vit_h_bytes"]
    assert vit_h["full"] == 23_134_208 and vit_h["final_only"] == 64 * 64 * 256 * 2
    taps = 4 * (128 * 1280 + 128 * 4) + 128 * 4  # int8 values, float32 scales, int32 positions
    assert vit_h[MIXED32] == 64 * 64 * 256 * 2 + taps
    assert vit_h[INT8] == 64 * 64 * 256 + 64 * 64 * 4 + taps
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
            k: 50 * (r["iou"][0] + _records(work, run_name(arm, 1))[k]["iou"][0])
            for k, r in _records(work, run_name(arm, 0)).items()
        }
        for arm in ARMS
    }
    for new, base in comparisons(ARMS):
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
    assert table["header"] == ["student", "ViT-H MB / sample", "GT mIoU", "teacher agreement"]
    seeds = result["gt_iou_by_seed"]["full"]
    assert table["rows"][0][:3] == [
        "whole taps, `embed=fp16,blocks=int8`",
        "23.13",
        f"{result['gt_iou']['full']:.1f} ({seeds[0]:.1f}, {seeds[1]:.1f})",
    ]
    assert table["rows"][2][:2] == ["taps at `tokens=32`, `int8`", "1.72"]
    d = result[f"{INT8} - full"]["gt_iou"]
    assert table["rows"][5][2].startswith(f"{d['mean']:+.2f} +- {d['se']:.2f} (")
    assert table["rows"][-1][0] == "final embedding only: seed 1 - seed 0"


def test_the_verdict_follows_the_paired_figures(bench):
    _, result = bench
    for arm in (MIXED32, INT8):
        d = result[f"{arm} - full"]["gt_iou"]
        got = result["verdict"][arm]
        assert got["gt_iou_within_se_of_full"] == (d["mean"] >= -d["se"])
        assert got["vit_h_bytes"] == result["vit_h_bytes"][arm]
    full = result["full - final_only"]["agreement"]
    assert result["verdict"]["taps_help"]["agreement"] == (full["mean"] > full["se"])


@pytest.mark.parametrize(
    "settings, message",
    [
        ("int8", "give CODEC:REDUCTION"),
        ("int8:none", "give tokens=K"),
        ("int8:tokens=4; int8:tokens=4", "given twice"),
        ("int9:tokens=4", "choose one of"),
    ],
)
def test_bad_settings_name_the_flag(settings, message):
    with pytest.raises(ValueError, match=message) as err:
        FidelityConfig(settings=settings)
    assert str(err.value).startswith("--settings")
