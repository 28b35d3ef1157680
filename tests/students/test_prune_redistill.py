"""A pruned student re-distilled from the same cache (launch/distill.py --init) comes back to the
unpruned student's teacher agreement on the demo data (eval/coco.py --compare-ckpt)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from students.export import read_export_meta
from students.load import load_sam
from teachers.build import random_vit_tiny
from tests.conftest import REPO, unplaced_env

pytestmark = pytest.mark.slow

# Agreement (mIoU x 100 with the teacher's masks), measured twice with the same result on a
# 2-core CPU: unpruned 72.2 after 40 steps; heads 0.5 pruned 70.1, and 75.5 after 20
# re-distillation steps, a recovery of 5.4 points. The test asks for half that recovery.
RECOVERY = 2.7
DISTILL = ["--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu"]
DISTILL += ["--engine", "torch", "--log-every", "20"]


def _run(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=unplaced_env(),
        capture_output=True,
        text=True,
        timeout=900,  # only a hang stops here
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def _agreement(ckpt, coco, teacher, out) -> float:
    _run(
        "eval/coco.py",
        "--ckpt",
        str(ckpt),
        "--coco-root",
        str(coco),
        "--compare-ckpt",
        str(teacher),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
    )
    return json.loads(out.read_text())["compare"]["agreement"]["miou"]["all"]


def test_pruned_then_redistilled_student_keeps_teacher_agreement(distilled_run, tmp_path):
    teacher_ckpt = tmp_path / "teacher.pth"
    torch.save(random_vit_tiny().state_dict(), teacher_ckpt)  # the cache's seed-0 teacher
    cache, coco = str(distilled_run / "cache"), distilled_run / "coco"
    student = distilled_run / "run" / "student.pt"
    _run(
        "launch/export.py",
        "--ckpt",
        str(student),
        "--out",
        str(tmp_path / "pruned"),
        "--prune",
        "heads",
        "--ratio",
        "0.5",
        "--calib-shards",
        cache,
    )
    pruned = tmp_path / "pruned" / "pruned.pt"
    report = json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert report["removed_fraction"] == 0.5
    params = [
        sum(p.numel() for p in load_sam(f).image_encoder.parameters()) for f in (student, pruned)
    ]
    assert params == [report["params_before"], report["params_after"]]
    _run(
        "launch/distill.py",
        "--init",
        str(pruned),
        "--shards",
        cache,
        "--out",
        str(tmp_path / "re"),
        "--steps",
        "20",
        "--lr",
        "1e-3",
        *DISTILL,
    )
    meta = read_export_meta(tmp_path / "re" / "student.pt")
    assert meta["student"] == read_export_meta(pruned)["student"]  # the pruned architecture
    base = _agreement(student, coco, teacher_ckpt, tmp_path / "a.json")
    before = _agreement(pruned, coco, teacher_ckpt, tmp_path / "b.json")
    after = _agreement(tmp_path / "re" / "student.pt", coco, teacher_ckpt, tmp_path / "c.json")
    print(f"teacher agreement: unpruned {base:.1f}, pruned {before:.1f}, re-distilled {after:.1f}")
    # Re-distillation recovers what pruning cost: the pruned student alone (after == before)
    # fails both, where `after >= base - 5` held before any re-distillation (70.1 >= 67.2).
    assert after >= before + RECOVERY
    assert after >= base - (base - before) / 2  # at least half the gap to the unpruned closed
