"""The claims benchmark end to end at --quick: every arm ran, its paired figures are the
per-instance differences of the reports they pair, and the figures that hold at any budget hold:
a distilled student beats the undistilled one clearly, int8 (PyTorch and both ONNX paths) keeps
the fp32 student's GT mIoU within a point, and the adapters' costs add up. A rerun into the same --work with another setup is refused, naming the setting."""

import json
import math
import statistics
import subprocess
import sys

import pytest

from students.adapters import list_adapters
from tests.conftest import REPO, unplaced_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    work = tmp_path_factory.mktemp("claims")
    out = work / "claims.json"
    cmd = [sys.executable, "launch/bench/claims.py", "--work", str(work)]
    done = subprocess.run(
        [*cmd, "--quick", "--out", str(out)],
        cwd=REPO,
        env=unplaced_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work, json.loads(out.read_text()), cmd


def _gt(work, name):
    path = work / "eval" / f"{name}_multimask.json.instances.jsonl"
    return {r["id"]: 100 * r["iou"][0] for r in map(json.loads, path.read_text().splitlines())}


def test_every_arm_and_its_comparisons_are_in_the_results(bench):
    _, result, _ = bench
    arms = {"distill", "dld", "attention", "phase2", "deploy", "adapters"}
    assert set(result) >= arms | {"tables", "plot"}
    assert set(result["dld"]) == {
        f"progressive - {m}" for m in ("stepwise", "uniform", "final_only")
    }
    assert set(result["attention"]["latency_ms_1024"]) == {"dfa", "windowed", "global"}
    assert len(result["phase2"]) == 4 and len(result["deploy"]) == 7
    rows = result["tables"]["claims"]["rows"]
    assert len(rows) == 4 + 3 + 2 + 4 + 7 and all(len(r) == 7 for r in rows)
    methods = list_adapters()
    assert set(result["adapters"]["costs"]) == set(methods)
    assert {f"{m} - un-adapted" for m in methods} <= set(result["adapters"])
    assert len(result["tables"]["adapters"]["rows"]) == len(methods)
    assert "keeps" in result["tables"]["headline"] and result["plot"].endswith(".png")


def test_paired_figures_are_the_per_instance_differences(bench):
    work, result, _ = bench
    base, new = _gt(work, "progressive"), _gt(work, "uniform")
    diffs = [base[k] - new[k] for k in sorted(base)]
    got = result["dld"]["progressive - uniform"]
    assert got["n"] == len(diffs) > 5
    assert got["mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-9)
    assert got["se"] == pytest.approx(statistics.stdev(diffs) / len(diffs) ** 0.5, abs=1e-9)


def test_distillation_beats_no_distillation_and_int8_keeps_the_fp32_miou(bench):
    _, result, _ = bench
    gain = result["distill"]["student - undistilled"]
    assert gain["mean"] > 3 and gain["mean"] > 2 * gain["se"], gain
    miou = result["distill"]["miou"]
    assert miou["teacher"] > miou["undistilled"]
    share = result["distill"]["share_of_teacher"]
    assert share == pytest.approx(miou["student"] / miou["teacher"], rel=1e-12)
    for path in ("torch", "onnx_dynamic", "onnx_static"):
        int8 = result["deploy"][f"int8_{path} - fp32"]
        assert abs(int8["mean"]) < 1.0, (path, int8)


def test_adapter_costs_split_into_the_adapter_and_the_decoder(bench):
    """Every method trains the same mask decoder beside its adapter, so its trainable count is
    the decoder's plus the adapter's, and the decoder's saved activations are the same bytes.
    CAD and META run the frozen encoder without autograd: nothing saved there; the adapters
    inside the encoder (LoRA, Conv-LoRA, SAM-Adapter) save its activations."""
    _, result, _ = bench
    costs = result["adapters"]["costs"]
    decoder = costs["decoder"]
    assert decoder["trainable_adapter"] == 0 and decoder["saved_bytes_encoder"] == 0
    for method, c in costs.items():
        assert c["trainable"] == decoder["trainable"] + c["trainable_adapter"], method
        assert c["saved_bytes_decoder"] == decoder["saved_bytes_decoder"], method
        # a timing (one run of each encoder at --quick): a real ratio, held to no clock bound
        assert math.isfinite(c["latency_ratio"]) and c["latency_ratio"] > 0, method
    for method in ("cad", "meta"):
        assert costs[method]["saved_bytes_encoder"] == 0 < costs[method]["saved_bytes_branch"]
    for method in ("lora", "conv_lora", "sam_adapter"):
        assert costs[method]["saved_bytes_encoder"] > 0 == costs[method]["saved_bytes_branch"]


def test_a_work_folder_made_with_another_setup_is_refused_by_name(bench):
    work, _, cmd = bench
    done = subprocess.run(
        [*cmd, "--out", str(work / "other.json")],  # the full run's sizes
        cwd=REPO,
        env=unplaced_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "steps" in done.stderr and str(work) in done.stderr
