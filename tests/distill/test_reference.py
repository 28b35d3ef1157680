"""The reference teacher's training job (distill/reference.py, launch/train_reference.py): its
loss, its prompts and targets, and the first steps reproduced exactly on a rerun."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

from distill.reference import ReferenceConfig, image_sample, mask_losses, prompt_loss
from tests.conftest import REPO, unplaced_env


def test_mask_losses_are_zero_iou_one_for_a_confident_exact_mask() -> None:
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 3:7] = 1
    loss, iou = mask_losses(40 * (2 * target - 1), target)
    assert torch.allclose(loss, torch.zeros(2), atol=1e-6) and torch.equal(iou, torch.ones(2))
    loss_wrong, iou_wrong = mask_losses(-40 * (2 * target - 1), target)
    assert (loss_wrong > 30).all() and torch.equal(iou_wrong, torch.zeros(2))


def test_prompt_loss_takes_the_best_multimask_output_and_skips_invalid_prompts() -> None:
    target = torch.zeros(1, 2, 8, 8)
    target[0, 0, :4] = 1
    good, bad = 40 * (2 * target[0, 0] - 1), -40 * (2 * target[0, 0] - 1)
    logits = torch.stack([good, bad, good, bad])[None, None].repeat(
        1, 2, 1, 1, 1
    )  # [1, 2, 4, 8, 8]
    iou_pred = torch.tensor([[[1.0, 0.0, 1.0, 0.0]] * 2])
    valid = torch.tensor([[True, False]])  # the second prompt is padding: never counted
    terms = prompt_loss(logits, iou_pred, target, valid)
    # single output (0) exact, best multimask (2) exact, IoU head exact: all near zero
    assert terms["loss"].item() < 1e-5
    logits[0, 0, 2] = bad  # now the best multimask output is wrong everywhere
    assert prompt_loss(logits, iou_pred, target, valid)["mask"].item() > 30


def test_a_training_image_has_prompts_and_targets_inside_the_input() -> None:
    rng = np.random.default_rng(0)
    labels = np.zeros((100, 150), dtype=np.int32)
    labels[10:40, 20:60], labels[50:90, 100:140] = 1, 2
    image = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    cfg = ReferenceConfig(out="x", prompts_per_image=3, loss_side=64)
    sample = image_sample(image, labels, cfg, rng, 128)
    assert sample["images"].shape == (3, 128, 128)
    assert sample["valid"].tolist() == [True, True, False]  # two instances, a padding slot
    h = round(100 * 128 / 150 * 64 / 128)  # the target's rows inside the 64-px square
    assert sample["target"][:2, h + 1 :].sum() == 0 and sample["target"][:2].sum() > 0
    assert (sample["boxes"][:2] >= -20).all() and (sample["boxes"][:2] <= 128 + 20).all()


@pytest.mark.slow
def test_the_first_steps_are_the_same_on_a_rerun(tmp_path) -> None:
    """Two runs side by side, one thread each (so their float sums run in one order)."""

    def start(out):
        cmd = [sys.executable, "launch/train_reference.py", "--out", str(out), "--steps", "2"]
        cmd += ["--batch-size", "2", "--prompts-per-image", "2", "--val-scenes", "2"]
        cmd += ["--no-progress", "--device", "cpu"]
        env = unplaced_env(OMP_NUM_THREADS="1")
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def losses(out, proc):
        _, stderr = proc.communicate(timeout=600)  # only catches a hang
        assert proc.returncode == 0, stderr[-2000:]
        with open(out / "log.csv", newline="") as f:
            return [(r["loss_total"], r["loss_mask"], r["loss_iou"]) for r in csv.DictReader(f)]

    runs = {out: start(out) for out in (tmp_path / "a", tmp_path / "b")}
    try:
        first, again = (losses(out, proc) for out, proc in runs.items())
    finally:  # a failed or hung run does not leave the other running after the test
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    assert len(first) == 2 and first == again
    assert (tmp_path / "a" / "sam_mini.pth").is_file()
