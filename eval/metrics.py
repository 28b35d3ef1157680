"""Pure metrics: mask IoU on pycocotools RLEs, EfficientViT-SAM's area buckets, mIoU aggregation,
and mask AP through the official evaluators (`pycocotools` COCOeval, `lvis` LVISEval).

Nothing here touches a model: the AP functions score given masks, so a test can hand them
perfect (or broken) detections and check the numbers.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Sequence

import numpy as np
import pycocotools.mask as mask_utils
from lvis import LVIS, LVISEval, LVISResults
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Area cut-offs on the annotation's `area` field (segment area, not box area), as in
# EfficientViT-SAM's sam_eval_utils.py: small <= 32^2 <= medium <= 96^2 <= large, both bounds
# inclusive, so an area of exactly 1024 or 9216 counts in two buckets.
AREA_SMALL_MAX = 32**2
AREA_LARGE_MIN = 96**2
BUCKETS = ("all", "small", "medium", "large")
COCO_AP_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
COCO_MAX_DETS = (1, 10, 100)
LVIS_MAX_DETS = 300


def encode_masks(masks: np.ndarray) -> list[dict]:
    """RLEs (pycocotools, `counts` as bytes) of [N, H, W] bool masks, one per mask."""
    if masks.ndim != 3:
        raise ValueError(f"encode_masks expects [N, H, W] masks, got shape {masks.shape}")
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))


def mask_iou(a: dict, b: dict, both_empty: float = 0.0) -> float:
    """IoU in [0, 1] of two RLEs of the same size, by `pycocotools.mask.iou` with iscrowd 0.

    Crowd ground truth is scored with this plain IoU too (pycocotools' crowd mode would divide by
    the prediction's area instead). Two empty masks have no union: they score `both_empty`, 0 by
    default, which is what EfficientViT-SAM's `inter / (union + 1e-7)` gives.
    """
    if a["size"] != b["size"]:
        raise ValueError(f"mask sizes differ: {a['size']} vs {b['size']}")
    if mask_utils.area(a) == 0 and mask_utils.area(b) == 0:
        return float(both_empty)
    return float(mask_utils.iou([a], [b], [0])[0, 0])


def area_buckets(area: float) -> tuple[str, ...]:
    """The buckets an instance of annotation `area` counts in: 'all' plus small/medium/large."""
    names = ["all"]
    if area <= AREA_SMALL_MAX:
        names.append("small")
    if AREA_SMALL_MAX <= area <= AREA_LARGE_MIN:
        names.append("medium")
    if area >= AREA_LARGE_MIN:
        names.append("large")
    return tuple(names)


def miou_by_area(areas: Sequence[float], ious: Sequence[float]) -> dict[str, dict]:
    """{"miou": {bucket: mean IoU x 100 or None when empty}, "count": {bucket: n}}.

    A plain mean over instances (not per image or per category), as EfficientViT-SAM reports.
    """
    if len(areas) != len(ious):
        raise ValueError(f"{len(areas)} areas but {len(ious)} IoUs")
    sums, counts = dict.fromkeys(BUCKETS, 0.0), dict.fromkeys(BUCKETS, 0)
    for area, iou in zip(areas, ious, strict=True):
        for name in area_buckets(area):
            sums[name] += iou
            counts[name] += 1
    miou = {k: (100.0 * sums[k] / counts[k] if counts[k] else None) for k in BUCKETS}
    return {"miou": miou, "count": counts}


def _quiet(fn, *args, **kwargs):
    # pycocotools prints progress and the summary table on stdout; we print our own table.
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def keep_gt(dataset: dict, min_area: float | None) -> tuple[dict, int]:
    """A shallow copy of a COCO/LVIS dataset dict without annotations of `area < min_area`,
    and how many were dropped. min_area None keeps everything."""
    if min_area is None:
        return dataset, 0
    kept = [a for a in dataset["annotations"] if a["area"] >= min_area]
    return {**dataset, "annotations": kept}, len(dataset["annotations"]) - len(kept)


def coco_api(dataset: dict) -> COCO:
    """A pycocotools COCO index over an already parsed dataset dict (no second json read)."""
    coco = COCO()
    coco.dataset = dataset
    _quiet(coco.createIndex)
    return coco


class _LVISFromDict(LVIS):
    """lvis 0.5.3's LVIS reads only from a path; this indexes an already parsed dict."""

    def __init__(self, dataset: dict) -> None:  # LVIS.__init__ would read a file
        self.logger = logging.getLogger("lvis")
        self.dataset = dataset
        self._create_index()


def lvis_api(dataset: dict) -> LVIS:
    return _LVISFromDict(dataset)


def _segm_results(results: Iterable[dict]) -> list[dict]:
    # Keep only what the segm evaluators read. A `bbox` key would make pycocotools' loadRes
    # treat the results as boxes and use box area for the area ranges (EfficientViT pops it too).
    out = []
    for r in results:
        segm = dict(r["segmentation"])
        if isinstance(segm["counts"], bytes):
            segm["counts"] = segm["counts"].decode("ascii")
        out.append(
            dict(
                image_id=r["image_id"],
                category_id=r["category_id"],
                score=r["score"],
                segmentation=segm,
            )
        )
    return out


def _percent(value: float) -> float | None:
    # The evaluators give -1 where a figure is undefined (no GT in that area range or group).
    return None if value < 0 else 100.0 * float(value)


def coco_mask_ap(gt: dict, results: Iterable[dict], img_ids: Sequence[int] | None = None) -> dict:
    """COCOeval segm mask AP x 100 (maxDets 1, 10, 100) of detections with RLE `segmentation`,
    `score`, `category_id`, `image_id`; restricted to `img_ids` when given."""
    results = _segm_results(results)
    if not results:
        raise ValueError("no detections to score: the detections json has none for these images")
    coco_gt = coco_api(gt)
    ev = COCOeval(coco_gt, _quiet(coco_gt.loadRes, results), "segm")
    ev.params.maxDets = list(COCO_MAX_DETS)
    if img_ids is not None:
        ev.params.imgIds = sorted(img_ids)
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    return {k: _percent(v) for k, v in zip(COCO_AP_NAMES, ev.stats, strict=True)}


def _lvis_numpy_compat() -> None:
    # lvis 0.5.3 (the latest release) calls np.float in LVISEval.accumulate; NumPy 1.24 removed
    # that alias of the builtin float. Restoring it changes nothing else.
    if not hasattr(np, "float"):
        np.float = float  # type: ignore[attr-defined]


def lvis_mask_ap(
    gt: dict,
    results: Iterable[dict],
    img_ids: Sequence[int] | None = None,
    max_dets: int = LVIS_MAX_DETS,
) -> dict:
    """LVISEval segm mask AP x 100 (max_dets 300 per image, as LVIS defines), all its figures
    (AP, AP50, AP75, APs/m/l, APr/c/f, AR...)."""
    results = _segm_results(results)
    if not results:
        raise ValueError("no detections to score: the detections json has none for these images")
    _lvis_numpy_compat()
    lvis_gt = lvis_api(gt)
    logging.getLogger("lvis").setLevel(logging.ERROR)  # it warns about every results list
    ev = LVISEval(lvis_gt, LVISResults(lvis_gt, results, max_dets=max_dets), "segm")
    if img_ids is not None:
        ev.params.img_ids = sorted(img_ids)
    _quiet(ev.run)
    return {k: _percent(v) for k, v in ev.get_results().items()}


def detection_ap(
    kind: str,
    gt: dict,
    results: Iterable[dict],
    img_ids: Sequence[int] | None = None,
    min_gt_area: float | None = 1.0,
) -> dict:
    """Mask AP of `results` against dataset dict `gt` ('coco' or 'lvis').

    Ground truth with `area < min_gt_area` is dropped first (None keeps it): no mask can match an
    empty one, so it would only cap the AP of its category, for every model alike. The result
    carries `num_gt_dropped` so a reader sees whether this changed anything.
    """
    gt, dropped = keep_gt(gt, min_gt_area)
    if kind == "coco":
        ap = coco_mask_ap(gt, results, img_ids)
    elif kind == "lvis":
        ap = lvis_mask_ap(gt, results, img_ids)
    else:
        raise ValueError(f"unknown dataset kind {kind!r}: choose coco or lvis")
    return {**ap, "num_gt_dropped": dropped}
