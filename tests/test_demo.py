"""The README's first command: the demo runs end to end in the reference world, with the shipped
teacher, and reports ground-truth figures that mean something."""

import json
import subprocess
import sys

import pytest

from launch.demo import ADAPT_VAL
from teachers.cache_read import load_manifest
from tests.conftest import REPO


@pytest.mark.slow
def test_demo_runs(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "launch/demo.py",
            "--out",
            str(tmp_path),
            "--num-images",
            "8",
            "--held-images",
            "6",
            "--steps",
            "8",
            "--phase2-steps",
            "4",
            "--adapt-steps",
            "4",
            "--speed-models",
            "dfa_t",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,  # only catches a hang
    )
    assert result.returncode == 0, result.stderr
    assert "RANDOM" not in result.stdout + result.stderr  # the shipped sam_mini, not vit_tiny
    assert "verify  OK" in result.stdout
    manifest = load_manifest(tmp_path / "cache")
    assert manifest["complete"] and manifest["num_samples"] == 8
    assert (tmp_path / "run" / "student.pt").exists() and (
        tmp_path / "run" / "training.png"
    ).exists()
    assert "distillation  8 steps on 2 processes" in result.stdout
    assert (
        "teacher agreement" in result.stdout
        and len(list((tmp_path / "overlays").glob("*.png"))) == 6
    )
    # Ground truth on held-out scenes: the shipped teacher segments (the random vit_tiny scored
    # about 3.5); on six scenes it may sit either side of the box-fill baseline (teachers/README.md)
    figures = json.loads((tmp_path / "eval.json").read_text())
    teacher, fill = figures["compare"]["miou"]["all"], figures["baseline_box"]["miou"]["all"]
    assert teacher > 0.5 * fill > 10, (teacher, fill)
    assert "box-fill baseline" in result.stdout and "of the teacher's" in result.stdout
    stages = ("scenes", "cache", "distillation", "evaluation", "phase 2", "adaptation", "speed")
    assert all(f"{name} " in result.stdout.split("time  ")[-1] for name in stages)
    # Phase 2 from the distilled student, scored on the same images and box prompts.
    assert "phase 2  teacher agreement" in result.stdout
    phase1 = json.loads((tmp_path / "eval.json").read_text())
    phase2 = json.loads((tmp_path / "eval_phase2.json").read_text())
    assert phase2["num_instances"] == phase1["num_instances"] > 0
    assert phase2["compare"]["agreement"]["miou"]["all"] > 0
    assert (
        phase2["compare"]["agreement"]["miou"]["all"]
        != phase1["compare"]["agreement"]["miou"]["all"]
    )
    assert (tmp_path / "phase2" / "student.pt").exists()
    assert "| dfa_t | 1024 |" in result.stdout
    # The adapt stage: CAD on the distilled student, scored beside the un-adapted one.
    assert "adaptation  CAD on the frozen student: val IoU" in result.stdout
    scored = json.loads((tmp_path / "masks.json").read_text())
    assert [m["ckpt"] for m in scored["models"]] == [
        str(tmp_path / "adapt" / "adapted.pt"),
        str(tmp_path / "run" / "student.pt"),
    ]
    assert scored["num_images"] == ADAPT_VAL and (tmp_path / "adapt" / "training.png").exists()
