"""launch/bench/deploy.py in tiny runs: every form's row, the fp32 reference, the peers beside\nrandom-weight students, real figures; its flag errors."""

from __future__ import annotations

import json

import pytest
import torch

from eval.scenes.synthetic import make_coco
from launch.bench import deploy as bench_deploy
from students import build_student
from students.export import save_student
from students.quant import cpu_has_vnni


@pytest.mark.slow
def test_bench_deploy_rows(tiny_sam, tmp_path, capsys):
    torch.manual_seed(0)
    student = build_student("dfa_t", img_size=64)
    ckpt = save_student(
        tmp_path / "s.pt", student, tiny_sam, teacher="vit_tiny", teacher_sha256="x", step=1
    )
    out = tmp_path / "bench.json"
    argv = ["--ckpt", str(ckpt), "--pruned", str(ckpt), "--prune", "mlp:0.5"]
    argv += ["--num-images", "2", "--num-calib", "2", "--repeats", "1", "--out", str(out)]
    make_coco(tmp_path / "held", num_images=2, seed=3)
    assert bench_deploy.main([*argv, "--coco-root", str(tmp_path / "held")]) == 0
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
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
    # Dynamic int8 leaves the neck's convolutions fp32 (measured 0.72 of the fp32 file).
    for name, share in (("int8_onnx_dynamic", 0.8), ("int8_onnx_static", 0.7), ("int8_torch", 0.7)):
        assert rows[name]["bytes"] < share * rows["fp32_onnx"]["bytes"]
        assert 0 < rows[name]["rel_error"] < 1 and rows[name]["latency_ms"] > 0
    # GT mIoU of every form on the held-out scenes, paired per instance with fp32 PyTorch: the
    # same model again differs by exactly 0, fp32 ONNX by under 0.5 point (masks all but equal).
    gt = result["gt"]
    assert (
        set(gt) == set(rows)
        and len({v["n"] for v in gt.values()}) == 1
        and gt["fp32_torch"]["n"] > 0
    )
    assert gt[f"pruned:{tmp_path.name}/s.pt"]["mean"] == 0.0 == gt["fp32_torch"]["se"]
    assert abs(gt["fp32_onnx"]["mean"]) < 0.5 and 0 < gt["fp32_onnx"]["new_miou"] <= 100
    table = capsys.readouterr().out
    assert "| int8_onnx_static |" in table and "the fastest int8 form, int8_" in table


@pytest.mark.slow
def test_bench_deploy_students_and_peers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--students", "dfa_t", "--peers", "efficientvit_sam_l0", "--image-size", "64"]
    argv += ["--int8", "onnx_static,torch", "--num-images", "1", "--num-calib", "1"]
    assert bench_deploy.main([*argv, "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    ours = {r["variant"]: r for r in result["rows"] if r["model"] == "dfa_t"}
    assert set(ours) == {"fp32_torch", "fp32_onnx", "int8_onnx_static", "int8_torch"}
    assert all(r["input"] == 64 and "box_agreement_miou" not in r for r in ours.values())
    # int8 of a random 64-px student: rel. error measured 0.23 on a CPU without VNNI, under 0.2
    # with it (students/README.md, int8 on x86 CPUs without VNNI)
    worst = 0.2 if cpu_has_vnni() else 0.5
    assert ours["fp32_onnx"]["rel_error"] < 1e-5 < ours["int8_onnx_static"]["rel_error"] < worst
    # The peer at its native 512 px and at the students' 64 px, as ONNX only, no ratio to torch.
    peers = [r for r in result["rows"] if r["model"] == "efficientvit_sam_l0"]
    assert sorted(r["input"] for r in peers) == [64, 512]
    assert all(r["variant"] == "fp32_onnx" and r["latency_ratio"] is None for r in peers)
    summary = result["summary"]["dfa_t"]
    int8 = {k: v["latency_ms"] for k, v in ours.items() if k.startswith("int8_")}
    assert summary["best_int8"] == min(int8, key=int8.get)
    speedup = ours["fp32_torch"]["latency_ms"] / int8[summary["best_int8"]]
    assert summary["best_int8_speedup"] == pytest.approx(speedup, rel=1e-9)
    for r in peers:
        ratio = r["latency_ms"] / ours["fp32_onnx"]["latency_ms"]
        assert summary["peer_onnx_over_fp32_onnx"][f"efficientvit_sam_l0@{r['input']}"] == ratio
    assert len(result["tables"]["forms"]["rows"]) == len(result["rows"]) == 6
    assert result["tables"]["summary"]["rows"][0][-2:] == [
        f"{summary['peer_onnx_over_fp32_onnx'][f'efficientvit_sam_l0@{side}']:.2f}x"
        for side in (64, 512)
    ]
    assert "`dfa_t` at 64 px: fp32 ONNX takes" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--ckpt/--students"),
        (["--students", "dfa_z"], "--students: unknown ['dfa_z']"),
        (["--students", "dfa_t", "--peers", "tinyvit"], "--peers: unknown ['tinyvit']"),
        (["--students", "dfa_t", "--int8", "onnx_int4"], "--int8: unknown ['onnx_int4']"),
        (["--students", "dfa_t", "--coco-root", "x"], "forms of --ckpt"),
        (["--students", "dfa_t", "--image-size", "100"], "--image-size 100"),
    ],
)
def test_bench_deploy_flag_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_deploy.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err
