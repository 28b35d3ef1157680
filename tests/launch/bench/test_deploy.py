"""launch/bench/deploy.py in one tiny run: every variant's row, the fp32 reference, real figures."""

from __future__ import annotations

import json

import pytest
import torch

from launch.bench import deploy as bench_deploy
from students import build_student
from students.export import save_student

pytestmark = pytest.mark.slow


def test_bench_deploy_rows(tiny_sam, tmp_path, capsys):
    torch.manual_seed(0)
    student = build_student("dfa_t", img_size=64)
    ckpt = save_student(
        tmp_path / "s.pt", student, tiny_sam, teacher="vit_tiny", teacher_sha256="x", step=1
    )
    out = tmp_path / "bench.json"
    argv = ["--ckpt", str(ckpt), "--pruned", str(ckpt), "--prune", "mlp:0.5"]
    argv += ["--num-images", "2", "--num-calib", "2", "--repeats", "1", "--out", str(out)]
    assert bench_deploy.main(argv) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    expected = {"fp32_torch", "fp32_onnx", "int8_onnx_dynamic", "int8_onnx_static", "int8_torch"}
    assert expected <= set(rows) and "pruned:mlp0.5 (not re-distilled)" in rows
    ref = rows["fp32_torch"]
    assert ref["num_boxes"] > 0 and all(r["num_boxes"] == ref["num_boxes"] for r in rows.values())
    for r in rows.values():  # every ratio is to the fp32 row's latency
        assert r["latency_ratio"] == pytest.approx(r["latency_ms"] / ref["latency_ms"], rel=1e-12)
    # The same model through ONNX (rel. error measured 7.3e-7; 10x margin) and through load_sam
    # again (the same computation: exactly 0): the same masks for every box.
    onnx, itself = rows["fp32_onnx"], rows[f"pruned:{tmp_path.name}/s.pt"]
    assert onnx["rel_error"] < 7e-6 and onnx["box_agreement_miou"] == 100.0
    assert itself["rel_error"] == 0.0 and itself["box_agreement_miou"] == 100.0
    pruned = rows["pruned:mlp0.5 (not re-distilled)"]
    assert pruned["bytes"] < ref["bytes"] and pruned["rel_error"] > 1e-3
    for name in ("int8_onnx_dynamic", "int8_onnx_static", "int8_torch"):
        assert rows[name]["bytes"] < 0.7 * rows["fp32_onnx"]["bytes"]
        assert 0 < rows[name]["rel_error"] < 1 and rows[name]["latency_ms"] > 0
    table = capsys.readouterr().out
    assert "| int8_onnx_static |" in table and "fastest int8 path: int8_" in table
