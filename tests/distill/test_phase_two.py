"""Phase 2 of the distillation entry point (`--phase decoder`), run for real: resuming after
SIGKILL, one against two processes, and images without annotations."""

import json

import numpy as np
import pytest
import torch

from eval.scenes.synthetic import make_coco
from students.export import read_export_meta
from students.load import load_sam
from teachers import load_teacher
from teachers.cache import plan_cache, write_cache
from tests.conftest import killer_script
from tests.distill.runs import BASE, assert_same_columns, column, read_log, run_distill

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def phase_one(cache, tmp_path_factory):
    """A phase-1 dfa_t student (6 steps) for phase 2 to start from."""
    out = tmp_path_factory.mktemp("phase1") / "run"
    run_distill(
        "--shards", str(cache), "--out", str(out), "--steps", "6", "--batch-size", "4", *BASE
    )
    return out / "student.pt"


def _phase_two(cache, phase_one, steps):
    """Phase 2 with the decoder training too and a refinement round, so the checkpoint must
    carry the student's decoder and the clicks must replay."""
    return ["--shards", str(cache), "--steps", str(steps), "--batch-size", "4", *BASE] + [
        "--phase", "decoder", "--init", str(phase_one), "--tune", "both", "--max-prompts", "2",
        "--decode-iters", "1", "--lr", "1e-3", "--student", "dfa_t",
    ]  # fmt: skip


def _full_model(out):
    sam = load_sam(out / "student.pt")
    return {**sam.image_encoder.state_dict(), **sam.mask_decoder.state_dict(prefix="decoder.")}


def test_phase_two_sigkill_then_resume_auto_ends_like_an_uninterrupted_run(
    cache, phase_one, tmp_path
):
    args = [*_phase_two(cache, phase_one, 8), "--checkpoint-every", "4"]
    killer = killer_script("launch/distill.py", kill_at=6)
    killed = run_distill(*args, "--out", str(tmp_path / "killed"), script=killer, check=False)
    assert killed.returncode == -9
    resumed = run_distill(*args, "--out", str(tmp_path / "killed"), "--resume", "auto")
    assert "at step 4" in resumed.stdout
    run_distill(*args, "--out", str(tmp_path / "straight"))
    a, b = _full_model(tmp_path / "killed"), _full_model(tmp_path / "straight")
    assert read_export_meta(tmp_path / "straight" / "student.pt")["mask_decoder"] == "student"
    initial = load_sam(phase_one).mask_decoder.state_dict(prefix="decoder.")
    assert any(not torch.equal(b[k], initial[k]) for k in initial)  # the decoder trained
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    killed_log, straight_log = read_log(tmp_path / "killed"), read_log(tmp_path / "straight")
    assert [int(r["step"]) for r in killed_log] == list(range(1, 9))
    assert_same_columns(killed_log, straight_log, ["loss_total", "loss_mask"])
    assert [r["num_unprompted"] for r in killed_log] == [r["num_unprompted"] for r in straight_log]


def test_phase_two_one_and_two_processes_give_the_same_losses(cache, phase_one, tmp_path):
    args = [*_phase_two(cache, phase_one, 4), "--micro-batch-size", "2"]
    run_distill(*args, "--out", str(tmp_path / "one"))
    run_distill(*args, "--out", str(tmp_path / "two"), launcher="deepspeed")
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert_same_columns(one, two, ["loss_total", "loss_mask"])
    a = column(one, "loss_mask")
    assert np.isfinite(a).all() and a.min() > 0


def test_phase_two_counts_images_without_annotations_and_trains_on_the_rest(phase_one, tmp_path):
    """The documented rule: an image without a usable annotation adds no mask loss and is
    counted in log.csv (`num_unprompted`, cumulative)."""
    coco = tmp_path / "coco"
    make_coco(coco, num_images=4, seed=3)
    ann_file = coco / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    bare = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != bare]
    ann_file.write_text(json.dumps(data))
    teacher = load_teacher("vit_tiny", taps=(1, 3))
    write_cache(teacher, plan_cache(str(coco), 4), tmp_path / "cache", progress=False)
    args = ["--shards", str(tmp_path / "cache"), "--steps", "2", "--batch-size", "4", *BASE]
    args += ["--phase", "decoder", "--init", str(phase_one), "--max-prompts", "2"]
    run_distill(*args, "--out", str(tmp_path / "run"))
    rows = read_log(tmp_path / "run")
    # Two passes over the 4 images (one step each): the bare image twice, the rest trained on.
    assert [int(r["num_unprompted"]) for r in rows] == [1, 2]
    assert all(float(r["loss_mask"]) > 0 for r in rows)
