"""Overlay PNGs: one panel each for the image, the GT and every model, prompts drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from eval.prompts import Click
from eval.vis import blend, save_overlay


def test_blend_tints_only_mask_pixels() -> None:
    image = np.full((4, 5, 3), 100, np.uint8)
    masks = np.zeros((2, 4, 5), bool)
    masks[0, 0, 0] = masks[1, 3, 4] = True
    out = blend(image, masks)
    assert out.shape == (4, 5, 3) and out.dtype == np.float32
    assert np.allclose(out[1:3], 100 / 255)
    assert not np.allclose(out[0, 0], 100 / 255) and not np.allclose(out[0, 0], out[3, 4])


def test_save_overlay(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    gt = np.zeros((1, 60, 90), bool)
    gt[0, 10:30, 20:50] = True
    boxes = np.array([[20.0, 10.0, 50.0, 30.0]])
    clicks = [[Click(35, 20, True), Click(5, 5, False)]]
    path = save_overlay(tmp_path / "o.png", image, gt, [("a", gt, boxes), ("b", ~gt, clicks)])
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > 3 * png.height  # four panels side by side
