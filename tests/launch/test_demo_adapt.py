"""The demo's adapt stage settings (launch/demo.py ADAPT_SETTINGS) do not make a segmenting base
worse on the camouflage domain, where the full-image box at lr 1e-3 (its former settings) did.

The base is the shipped reference teacher `sam_mini` (the demo distils its student from it; a
test cannot distil one in seconds). Under the full-image box it finds no camouflaged object, so
the mask loss shrinks its mask towards empty; under the mask's box it segments, and adaptation
keeps that. Measured on the demo's distilled student (60 steps of batch 4, val IoU): full box at
lr 1e-3 0.21 -> 0.04 (area ratio 2.8 -> 0.8, the training masks' layout); GT box at lr 2e-4
0.48 -> 0.50 on 240 training pairs.

The test's domain (seed 0, 32 training pairs, 8 steps) changed val IoU, over domain and
adaptation seeds 0-4 (2-core CPU, 2026-12-07): under the demo's settings by +0.032, +0.005,
+0.020, -0.029 and -0.004; under the former ones by -0.165, -0.129, -0.154, -0.167 and -0.127,
with the foreground area falling from 4.8-5.9x the truth to 0.04x or less. TOLERANCE sits
about halfway between the two: twice the worst loss under the demo's settings, under half the
smallest under the former.
"""

from __future__ import annotations

import csv
import json

import pytest

from distill.adapt import train
from distill.config import AdaptConfig
from eval.mask_metrics import iou_dice
from eval.scenes.photos import make_camouflage_domain
from launch.demo import ADAPT_SETTINGS
from tests.conftest import REPO

pytestmark = pytest.mark.slow

STEPS = 8
FORMER = dict(ADAPT_SETTINGS, prompt="full_box", lr=1e-3)
TOLERANCE = 0.06  # val IoU the demo's settings may lose (8 val images; measured <= 0.029)


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    return make_camouflage_domain(
        tmp_path_factory.mktemp("camo"), num_train=32, num_val=8, size=128
    )


def adapt(settings: dict, data, out) -> tuple[dict, dict]:
    """(val before, val after) of STEPS adaptation steps of sam_mini with `settings`."""
    cfg = AdaptConfig(
        ckpt=str(REPO / "teachers" / "weights" / "sam_mini.pth"),
        data=str(data),
        out=str(out),
        steps=STEPS,
        val_every=STEPS,
        engine="torch",
        device="cpu",
        workers=0,
        progress=False,
        log_every=STEPS,
        **settings,
    )
    train(cfg, scorer=iou_dice)
    before = json.loads((out / "val_before.json").read_text())
    with open(out / "log.csv", newline="") as f:
        after = {k: float(v) for k, v in list(csv.DictReader(f))[-1].items() if v}
    return before, after


def test_demo_adapt_settings_keep_val_iou(domain, tmp_path):
    before, after = adapt(ADAPT_SETTINGS, domain, tmp_path)
    assert before["val_iou"] > 0.3  # the base segments under these prompts
    assert after["val_iou"] > before["val_iou"] - TOLERANCE, (before, after)
    assert 1 / 3 < after["val_area_ratio"] < 3


def test_former_full_box_settings_shrink_the_mask(domain, tmp_path):
    """Why the demo left them: no object found, so the loss empties the mask."""
    before, after = adapt(FORMER, domain, tmp_path)
    assert after["val_area_ratio"] < before["val_area_ratio"] / 2, (before, after)
    assert after["val_iou"] < before["val_iou"] - TOLERANCE
