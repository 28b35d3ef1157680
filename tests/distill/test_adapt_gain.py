"""What adaptation buys: on the synthetic camouflage domain each method ends at least its own
MIN_GAIN above the un-adapted model's val IoU, and its predicted foreground area stays within
AREA (no collapse to an empty or a full mask).

The base is a dfa_t student.pt at 128 px with random weights (no distilled weights can be
downloaded here) and the random vit_tiny's prompt encoder and mask decoder; under the full-image
box it scores a val IoU of 0.10-0.15. 100 steps of batch 4 at a constant lr 1e-3 moved val IoU,
over seeds 0-4 of the student, the domain and the adaptation (2-core CPU, 2026-12-07; the test
runs seed 0):

| method | gain, seeds 0-4 | smallest |
|---|---|---|
| cad | 0.62 0.53 0.51 0.50 0.55 | 0.50 |
| lora | 0.23 0.10 0.15 0.10 0.21 | 0.10 |
| decoder | 0.20 0.09 0.14 0.14 0.12 | 0.09 |
| sam_adapter | 0.16 0.07 0.14 0.14 0.19 | 0.07 |
| meta | 0.15 0.02 0.15 0.17 0.28 | 0.02 |
| conv_lora | 0.24 -0.04 0.15 0.14 0.13 | -0.04 |

MIN_GAIN is about half the smallest gain; conv_lora's gain did not hold on seed 1 (its mask
shrank to 0.34x the truth), so its bound only asks it to lose no more than twice that.
The foreground area ended at 0.34-2.06x the truth. CAD's FFT high-pass input sees the texture
change that the others must learn; the first 25-40 steps of every method sit on the "predict
nothing" plateau of a random decoder, which is why the runs are this long.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from distill.adapt import train
from distill.config import ADAPT_METHODS, AdaptConfig
from eval.mask_metrics import iou_dice
from eval.scenes.domain import make_domain
from students import build_student
from students.export import save_student
from teachers.build import random_vit_tiny

pytestmark = pytest.mark.slow

MIN_GAIN = {  # val IoU over the un-adapted model (the table above)
    "cad": 0.25,
    "lora": 0.04,
    "decoder": 0.04,
    "sam_adapter": 0.03,
    "meta": 0.01,
    "conv_lora": -0.07,
}
AREA = (1 / 6, 4.0)  # predicted / true foreground area on val (measured 0.34-2.06)
OPTIONS = {"cad": "width=32,input_size=128"}


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("gain")
    torch.manual_seed(0)
    student = build_student("dfa_t", img_size=128)
    base = save_student(
        root / "student.pt",
        student,
        random_vit_tiny(0),
        teacher="vit_tiny",
        teacher_sha256="random-seed-0",
        step=0,
    )
    return base, make_domain(root / "dom", num_train=16, num_val=8, size=160)


@pytest.mark.parametrize("method", ADAPT_METHODS)
def test_each_method_ends_above_its_bound_and_keeps_its_mask(setting, tmp_path, method):
    base, data = setting
    cfg = AdaptConfig(
        ckpt=str(base),
        data=str(data),
        out=str(tmp_path / method),
        method=method,
        options=OPTIONS.get(method, ""),
        steps=100,
        batch_size=4,
        lr=1e-3,
        min_lr_ratio=1.0,
        val_every=50,
        engine="torch",
        device="cpu",
        workers=0,
        progress=False,
        log_every=50,
    )
    train(cfg, scorer=iou_dice)
    before = json.loads((tmp_path / method / "val_before.json").read_text())
    with open(tmp_path / method / "log.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert before["val_iou"] < 0.2  # the domain is hard for the base
    assert float(last["val_iou"]) > before["val_iou"] + MIN_GAIN[method], (before, last)
    ratio = float(last["val_area_ratio"])
    assert AREA[0] < ratio < AREA[1], f"mask area ratio {ratio} after {method}"
