"""Pure prompt construction: the evaluation protocols' switches, GT boxes, and the click simulator.

Clicks follow the RITM clicker as EfficientViT-SAM uses it (ritm_interactive_segmentation
`isegm/inference/clicker.py`, efficientvit `applications/efficientvit_sam/sam_eval_utils.py`):
the error regions are padded by one pixel so that the image border counts as background, their
L2 distance transform (exact, `cv2.DIST_MASK_PRECISE`) is taken, pixels already clicked are
zeroed, and the click goes to the maximum of the region whose maximum is larger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

PROTOCOLS = ("efficientvit", "edgesam")


@dataclass(frozen=True)
class Protocol:
    """The switches that change mIoU between published protocols."""

    name: str = "efficientvit"
    """Which published protocol these switches follow (recorded in the output)."""
    include_crowd: bool = True
    """Evaluate `iscrowd=1` annotations too (EfficientViT-SAM: yes; EdgeSAM: no)."""
    multimask_output: bool = True
    """Ask for SAM's 3 masks and keep the highest predicted IoU (EfficientViT-SAM); False takes
    the single-mask output (EdgeSAM's boxes, TinySAM's asterisk)."""
    min_area: float = 1.0
    """Annotations with `area` below this are not evaluated (EfficientViT-SAM: `area < 1`)."""

    @classmethod
    def named(cls, name: str, single_mask: bool = False, no_crowd: bool = False) -> Protocol:
        """A published protocol by name, optionally with single-mask output or crowd dropped."""
        if name not in PROTOCOLS:
            raise ValueError(f"--protocol {name!r}: choose one of {', '.join(PROTOCOLS)}")
        edgesam = name == "edgesam"
        return cls(
            name=name,
            include_crowd=not (edgesam or no_crowd),
            multimask_output=not (edgesam or single_mask),
        )

    def keeps(self, ann: dict) -> bool:
        """Whether annotation `ann` is evaluated under this protocol."""
        return ann["area"] >= self.min_area and (self.include_crowd or not ann.get("iscrowd", 0))


def box_xyxy(bbox: Sequence[float]) -> list[float]:
    """COCO [x, y, w, h] to [x0, y0, x1, y1], unclipped and unrounded, as the reference does."""
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def boxes_xyxy(bboxes: Sequence[Sequence[float]]) -> np.ndarray:
    """[N, 4] float64 xyxy boxes from N COCO xywh boxes."""
    return np.array([box_xyxy(b) for b in bboxes], dtype=np.float64).reshape(-1, 4)


@dataclass(frozen=True)
class Click:
    """One simulated click at pixel (x, y) of the original image; positive = foreground."""

    x: int
    y: int
    positive: bool


def _distance(region: np.ndarray) -> np.ndarray:
    """[H, W] float32 L2 distance of each region pixel to the nearest non-region pixel, where
    everything outside the image counts as non-region (the 1-pixel zero padding)."""
    padded = np.pad(region.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def next_click(gt: np.ndarray, pred: np.ndarray | None, clicked: Sequence[Click] = ()) -> Click:
    """The next click for GT mask `gt` given the current prediction `pred` ([H, W] bool; None
    before the first click).

    False negatives give a positive click, false positives a negative one, each at its region's
    distance-transform maximum; the region whose maximum is larger wins, a tie goes to the
    negative click (the reference compares with `>`); ties inside a region go to the first pixel
    in raster order. Pixels clicked before are never chosen again. With no error left the
    reference's rule yields a negative click at (0, 0) (the first pixel of an all-zero map); we
    keep that for parity, it only happens after a pixel-perfect prediction.
    """
    gt = np.asarray(gt, dtype=bool)
    pred = np.zeros_like(gt) if pred is None else np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"gt and pred must be equal [H, W] masks, got {gt.shape} and {pred.shape}")
    fn, fp = _distance(gt & ~pred), _distance(~gt & pred)
    for c in clicked:
        fn[c.y, c.x] = fp[c.y, c.x] = 0.0
    positive = bool(fn.max() > fp.max())
    y, x = np.unravel_index(int(np.argmax(fn if positive else fp)), gt.shape)
    return Click(int(x), int(y), positive)


def click_arrays(clicks: Sequence[Sequence[Click]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-instance click lists of equal length K to SAM's point prompts: coords [N, K, 2]
    float64 (x, y) and labels [N, K] int (1 positive, 0 negative)."""
    coords = np.array([[(c.x, c.y) for c in cs] for cs in clicks], dtype=np.float64)
    labels = np.array([[int(c.positive) for c in cs] for cs in clicks], dtype=np.int64)
    return coords.reshape(len(clicks), -1, 2), labels.reshape(len(clicks), -1)
