"""Overlay PNGs: the image, its ground truth, the model's masks and the comparison model's masks
side by side, with the prompts drawn (boxes, or clicks: green positive, red negative)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from eval.prompts import Click


def _colours(n: int) -> np.ndarray:
    """[n, 3] distinct-ish colours in [0, 1], stable across panels (instance i, same colour)."""
    hues = (np.arange(n) * 0.61803398875) % 1.0
    return hsv_to_rgb(np.stack([hues, np.full(n, 0.85), np.full(n, 0.95)], 1))


def blend(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """[H, W, 3] float image in [0, 1] with each of the [N, H, W] masks tinted in its colour."""
    out = image.astype(np.float32) / 255.0
    for mask, colour in zip(masks, _colours(len(masks)), strict=True):
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return out


def _draw_prompts(ax, prompts) -> None:
    if isinstance(prompts, np.ndarray):  # [N, 4] xyxy boxes
        for (x0, y0, x1, y1), c in zip(prompts, _colours(len(prompts)), strict=True):
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=c, lw=1))
        return
    for clicks in prompts:  # per instance, a list of Click
        for c in clicks:
            assert isinstance(c, Click)
            ax.plot(c.x, c.y, "o", ms=3, mec="k", mew=0.5, color="lime" if c.positive else "red")


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    gt: np.ndarray,
    panels: Sequence[tuple[str, np.ndarray, object]],
) -> Path:
    """Write one PNG: the image, the GT masks [N, H, W], then one panel per (title, masks
    [M, H, W], prompts) entry, left to right."""
    n = 2 + len(panels)
    h, w = image.shape[:2]
    # 4.5 inches at 100 dpi: each panel about as wide as a 512-px image, masks readable
    fig = Figure(figsize=(4.5 * n, 4.5 * h / w + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=11)
    axes[1].imshow(blend(image, gt))
    axes[1].set_title(f"ground truth ({len(gt)})", fontsize=11)
    for ax, (title, masks, prompts) in zip(axes[2:], panels, strict=True):
        ax.imshow(blend(image, masks))
        if prompts is not None:
            _draw_prompts(ax, prompts)
        ax.set_title(title, fontsize=11)
    for ax in axes:
        ax.set_axis_off()
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


class Overlays:
    """The runner's per-image hook: overlays for the first `limit` images of this rank."""

    def __init__(self, folder: str | Path, limit: int, names: Sequence[str]) -> None:
        self.folder, self.limit, self.names, self.written = Path(folder), limit, names, 0

    def __call__(self, loaded, outs, records: list[dict]) -> None:
        if self.written >= self.limit:
            return
        panels = []
        for m, (name, (steps, prompts)) in enumerate(zip(self.names, outs, strict=True)):
            masks = mask_utils.decode(steps[-1]).transpose(2, 0, 1).astype(bool)
            title = Path(name).name
            if records and "iou" in records[0]:
                key = "iou" if m == 0 else "compare_iou"
                miou = 100 * np.mean([r[key][-1] for r in records])
                title += f"  mIoU {miou:.1f}"
            panels.append((title, masks, prompts))
        item = loaded.item
        save_overlay(
            self.folder / f"{item.image_id:012d}.png", loaded.image, loaded.gt_masks, panels
        )
        self.written += 1
