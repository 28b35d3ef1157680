"""Pure metrics: IoU on RLEs, area buckets, mIoU aggregation, and mask AP through COCOeval and
LVISEval on given (perfect or broken) masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from eval.metrics import (
    area_buckets,
    detection_ap,
    encode_masks,
    keep_gt,
    mask_iou,
    miou_by_area,
)
from eval.scenes.synthetic import instance_masks


def _rle(mask: np.ndarray) -> dict:
    return encode_masks(np.asarray(mask, bool)[None])[0]


def test_mask_iou_known_masks() -> None:
    a, b = np.zeros((6, 8), bool), np.zeros((6, 8), bool)
    a[1:4, 1:5] = True  # 12 pixels
    b[2:5, 3:7] = True  # 12 pixels, 4 shared
    assert mask_iou(_rle(a), _rle(b)) == pytest.approx(4 / 20)
    assert mask_iou(_rle(a), _rle(a)) == 1.0
    assert mask_iou(_rle(a), _rle(np.zeros_like(a))) == 0.0
    empty = _rle(np.zeros_like(a))
    assert mask_iou(empty, empty) == 0.0 and mask_iou(empty, empty, both_empty=1.0) == 1.0
    with pytest.raises(ValueError, match="sizes differ"):
        mask_iou(_rle(a), _rle(np.zeros((8, 6), bool)))


def test_mask_iou_is_plain_iou_for_crowd_too() -> None:
    # pycocotools' crowd mode would give inter / area(dt) = 1 here; the protocol wants IoU.
    gt, dt = np.zeros((5, 5), bool), np.zeros((5, 5), bool)
    gt[:, :4], dt[:, :2] = True, True
    assert mask_utils.iou([_rle(dt)], [_rle(gt)], [1])[0, 0] == 1.0
    assert mask_iou(_rle(dt), _rle(gt)) == pytest.approx(0.5)


def test_area_buckets_boundaries_are_inclusive() -> None:
    assert area_buckets(1) == ("all", "small")
    assert area_buckets(1023.9) == ("all", "small")
    assert area_buckets(1024) == ("all", "small", "medium")
    assert area_buckets(1024.5) == ("all", "medium")
    assert area_buckets(9216) == ("all", "medium", "large")
    assert area_buckets(9216.5) == ("all", "large")


def test_miou_by_area() -> None:
    out = miou_by_area([10, 1024, 5000, 20000], [0.5, 0.25, 1.0, 0.0])
    assert out["count"] == {"all": 4, "small": 2, "medium": 2, "large": 1}
    assert out["miou"] == pytest.approx({"all": 43.75, "small": 37.5, "medium": 62.5, "large": 0.0})
    empty = miou_by_area([10], [1.0])
    assert empty["miou"]["large"] is None and empty["count"]["large"] == 0
    with pytest.raises(ValueError, match="2 areas but 1"):
        miou_by_area([1, 2], [0.5])


def _perfect(dataset: dict, masks: dict[int, np.ndarray], score: float = 1.0) -> list[dict]:
    return [
        dict(
            image_id=a["image_id"],
            category_id=a["category_id"],
            score=score,
            segmentation=_rle(masks[a["id"]]),
        )
        for a in dataset["annotations"]
        if a["area"] >= 1
    ]


def test_coco_ap_perfect_and_broken(eval_coco: Path) -> None:
    path = eval_coco / "annotations" / "instances_val2017.json"
    dataset, masks = json.loads(path.read_text()), instance_masks(path)
    perfect = _perfect(dataset, masks)
    ap = detection_ap("coco", dataset, perfect)
    assert ap["num_gt_dropped"] == sum(a["area"] < 1 for a in dataset["annotations"]) > 0
    assert [ap[k] for k in ("AP", "AP50", "AP75", "APs", "APm")] == pytest.approx([100] * 5)
    assert ap["APl"] is None  # no large object: the evaluator's -1
    # Keeping the zero-area GT (the raw file) caps AP: its category can never be matched.
    raw = detection_ap("coco", dataset, perfect, min_gt_area=None)
    assert raw["num_gt_dropped"] == 0 and raw["AP"] == pytest.approx(100 * 5 / 6)
    # One mask shifted: less than perfect.
    broken = [dict(d) for d in perfect]
    mask = mask_utils.decode(broken[0]["segmentation"]).astype(bool)
    broken[0]["segmentation"] = _rle(np.roll(mask, mask.shape[1] // 2, axis=1))
    assert detection_ap("coco", dataset, broken)["AP"] < 100
    # Restricted to some images, and on a dataset dict left untouched.
    ids = sorted({d["image_id"] for d in perfect})[:3]
    subset = [d for d in perfect if d["image_id"] in ids]
    assert detection_ap("coco", dataset, subset, img_ids=ids)["AP"] == pytest.approx(100)
    assert len(dataset["annotations"]) == len(json.loads(path.read_text())["annotations"])


def test_lvis_ap_perfect_and_broken(eval_lvis: Path) -> None:
    path = eval_lvis / "lvis_v1_val.json"
    dataset, masks = json.loads(path.read_text()), instance_masks(path)
    perfect = _perfect(dataset, masks)
    ap = detection_ap("lvis", dataset, perfect)
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APr", "APc", "APf")
    assert [ap[k] for k in keys] == pytest.approx([100] * len(keys))
    assert ap["APl"] is None and ap["num_gt_dropped"] == 0
    empty = _rle(np.zeros_like(masks[dataset["annotations"][0]["id"]]))
    broken = [dict(perfect[0], segmentation=empty)] + perfect[1:]
    assert detection_ap("lvis", dataset, broken)["AP"] < 100


def test_ap_errors_and_keep_gt() -> None:
    dataset = {"images": [], "categories": [], "annotations": [{"area": 0.0}, {"area": 3.0}]}
    kept, dropped = keep_gt(dataset, 1.0)
    assert (
        dropped == 1 and kept["annotations"] == [{"area": 3.0}] and len(dataset["annotations"]) == 2
    )
    assert keep_gt(dataset, None) == (dataset, 0)
    with pytest.raises(ValueError, match="no detections"):
        detection_ap("coco", dataset, [])
    with pytest.raises(ValueError, match="unknown dataset kind"):
        detection_ap("voc", dataset, [{"image_id": 1}])
