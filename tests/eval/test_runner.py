"""The runner gives SamPredictor's masks: the encoder once per image and the prompts batched
through the decoder equal one `set_image` + `predict` per instance, and every IoU is
`pycocotools.mask.iou` on the same RLEs.

Batched and one-at-a-time decoding differ by float rounding in the decoder's matrix products
(about 1e-7 on predicted IoUs), so "equal" is checked as: the same mask is picked unless the
reference's top two predicted IoUs are within 1e-5, and any differing pixel has a reference
logit within 1e-5 of the threshold. On the generated data a handful of pixels in all differ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO
from segment_anything import SamPredictor

from eval.datasets import det_images, gt_images, load_coco
from eval.prompts import Protocol, box_xyxy, click_arrays, next_click
from eval.runner import Model, Task, image_records, load_item, load_model
from students.load import load_sam
from teachers.preprocess import load_image

TOL = 1e-5


@pytest.fixture(scope="module")
def model(tiny_ckpt: Path) -> Model:
    return load_model(str(tiny_ckpt), "cpu")


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path) -> SamPredictor:
    """The plain path: the same checkpoint, SamPredictor.set_image and predict."""
    return SamPredictor(load_sam(tiny_ckpt))


def _check_same_mask(ours: np.ndarray, reference: SamPredictor, **prompt) -> int:
    """Assert `ours` is what predict(**prompt) gives after the argmax; return differing pixels."""
    logits, scores, _ = reference.predict(**prompt, multimask_output=True, return_logits=True)
    best = int(np.argmax(scores))
    expected = logits[best] > reference.model.mask_threshold
    if not np.array_equal(ours, expected):
        top = np.sort(scores)[-2:]
        alternatives = [k for k in range(len(scores)) if scores[k] >= top[-1] - TOL]
        close = [
            k for k in alternatives if np.all(np.abs(logits[k][ours != (logits[k] > 0)]) < TOL)
        ]
        assert close, f"mask differs beyond rounding (prompt {prompt})"
        return int((ours != (logits[close[0]] > 0)).sum())
    return 0


def _coco_gt(root: Path) -> COCO:
    return COCO(str(root / "annotations" / "instances_val2017.json"))


def test_box_masks_and_ious_equal_predictor(eval_coco: Path, model: Model, reference) -> None:
    ds, gt = load_coco(eval_coco), _coco_gt(eval_coco)
    differing, count = 0, 0
    for item in gt_images(ds, Protocol()):
        loaded = load_item(ds, item, {model.img_size})
        records, outs = image_records([model], loaded, Task("box"))
        reference.set_image(load_image(item.path))
        rles = outs[0][0][0]
        for ann, rec, rle in zip(item.anns, records, rles, strict=True):
            ours = mask_utils.decode(rle).astype(bool)
            differing += _check_same_mask(ours, reference, box=np.array(box_xyxy(ann["bbox"])))
            gt_rle = gt.annToRLE(gt.anns[ann["id"]])  # the official API, independently
            assert rec["iou"] == [mask_utils.iou([rle], [gt_rle], [0])[0, 0]]
            assert (rec["id"], rec["area"], rec["iscrowd"]) == (
                ann["id"],
                ann["area"],
                ann["iscrowd"],
            )
            count += 1
    assert count == sum(a["area"] >= 1 for a in gt.anns.values())
    assert differing <= 20  # rounding-level flips only (checked pixel by pixel above)


def test_click_masks_equal_predictor(eval_coco: Path, model: Model, reference) -> None:
    ds, num_clicks, differing = load_coco(eval_coco), 3, 0
    for item in gt_images(ds, Protocol())[:4]:
        loaded = load_item(ds, item, {model.img_size})
        records, outs = image_records([model], loaded, Task("point", num_clicks))
        (steps, clicks) = outs[0]
        reference.set_image(load_image(item.path))
        for i, rec in enumerate(records):
            assert len(rec["iou"]) == len(steps) == len(clicks[i]) == num_clicks
            previous = None
            for k in range(num_clicks):
                # Clicks accumulate and follow the clicker on the previous mask.
                assert clicks[i][k] == next_click(loaded.gt_masks[i], previous, clicks[i][:k])
                coords, labels = click_arrays([clicks[i][: k + 1]])
                ours = mask_utils.decode(steps[k][i]).astype(bool)
                differing += _check_same_mask(
                    ours, reference, point_coords=coords[0], point_labels=labels[0]
                )
                assert (
                    rec["iou"][k] == mask_utils.iou([steps[k][i]], [loaded.gt_rles[i]], [0])[0, 0]
                )
                previous = ours
    assert differing <= 20  # rounding-level flips only (checked pixel by pixel above)


def test_boxes_outside_the_image_stay_unclipped(
    eval_coco: Path, tmp_path: Path, model, reference
) -> None:
    root = tmp_path / "coco"
    shutil.copytree(eval_coco, root)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    ann = next(a for a in data["annotations"] if a["area"] >= 1)
    ann["bbox"] = [ann["bbox"][0] - 30.5, ann["bbox"][1] - 20.0, ann["bbox"][2] + 500, 400.25]
    path.write_text(json.dumps(data))
    ds = load_coco(root)
    item = next(im for im in gt_images(ds, Protocol()) if im.image_id == ann["image_id"])
    records, outs = image_records([model], load_item(ds, item, {model.img_size}), Task("box"))
    i = [a["id"] for a in item.anns].index(ann["id"])
    reference.set_image(load_image(item.path))
    ours = mask_utils.decode(outs[0][0][0][i]).astype(bool)
    box = np.array(box_xyxy(ann["bbox"]))
    assert box[0] < 0 and box[2] > item.hw[1] and box[3] > item.hw[0]
    assert _check_same_mask(ours, reference, box=box) <= 3
    assert records[i]["iou"][0] == mask_utils.iou([outs[0][0][0][i]], [ds.gt_rle(ann)], [0])[0, 0]


def test_single_mask_protocol(eval_coco: Path, model: Model, reference) -> None:
    ds = load_coco(eval_coco)
    item = gt_images(ds, Protocol.named("edgesam"))[0]
    task = Task("box", protocol=Protocol.named("edgesam"))
    _, outs = image_records([model], load_item(ds, item, {model.img_size}), task)
    reference.set_image(load_image(item.path))
    for ann, rle in zip(item.anns, outs[0][0][0], strict=True):
        masks, _, _ = reference.predict(box=np.array(box_xyxy(ann["bbox"])), multimask_output=False)
        assert (mask_utils.decode(rle).astype(bool) != masks[0]).sum() <= 3


def test_compare_model_and_detections(eval_coco: Path, model: Model, tiny_ckpt, other_ckpt) -> None:
    ds = load_coco(eval_coco)
    item = gt_images(ds, Protocol())[1]
    loaded = load_item(ds, item, {model.img_size})
    same = load_model(str(tiny_ckpt), "cpu")
    records, _ = image_records([model, same], loaded, Task("box"))
    assert all(r["agreement"] == [1.0] and r["compare_iou"] == r["iou"] for r in records)
    records, _ = image_records([model, load_model(str(other_ckpt), "cpu")], loaded, Task("box"))
    assert any(r["agreement"][0] < 1.0 for r in records)
    # Detections with the GT boxes give the GT-box masks, as RLE records keyed by file index.
    box_records, box_outs = image_records([model], loaded, Task("box"))
    dets = [
        dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=0.5)
        for a in item.anns
    ]
    det_item = det_images(ds, dets)[0]
    det_records, _ = image_records([model], load_item(ds, det_item, {model.img_size}), Task("box"))
    assert [r["id"] for r in det_records] == list(range(len(dets)))
    for rec, rle in zip(det_records, box_outs[0][0][0], strict=True):
        assert rec["segmentation"]["counts"] == rle["counts"].decode("ascii")
        assert rec["score"] == 0.5 and "iou" not in rec
