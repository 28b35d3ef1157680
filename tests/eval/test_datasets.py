"""COCO/LVIS readers on generated files in the official layouts: GT formats, the protocol's
filters, image decoding (grayscale, RGBA, EXIF), missing files, empty and inconsistent data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from eval.datasets import (
    det_images,
    gt_images,
    load_coco,
    load_lvis,
    read_detections,
    split_missing,
)
from eval.prompts import Protocol
from eval.runner import load_item
from eval.scenes.synthetic import EXIF_ORIENTATION, instance_masks


def _coco_json(root: Path) -> Path:
    return root / "annotations" / "instances_val2017.json"


def test_gt_masks_of_every_format_match_pycocotools(eval_coco: Path) -> None:
    ds = load_coco(eval_coco)
    masks = instance_masks(_coco_json(eval_coco))
    formats = set()
    for ann in ds.gt["annotations"]:
        segm = ann["segmentation"]
        formats.add("polygon" if isinstance(segm, list) else type(segm["counts"]).__name__)
        assert np.array_equal(mask_utils.decode(ds.gt_rle(ann)).astype(bool), masks[ann["id"]])
    assert formats == {"polygon", "str", "list"}  # polygons, compressed RLE, crowd RLE
    image = gt_images(ds, Protocol())[0]
    rles, decoded = ds.gt_masks(image.anns)
    assert decoded.shape == (len(image.anns), *image.hw) and decoded.dtype == bool
    assert all(np.array_equal(m, masks[a["id"]]) for m, a in zip(decoded, image.anns, strict=True))


def test_protocol_selects_instances(eval_coco: Path) -> None:
    ds = load_coco(eval_coco)
    anns = ds.gt["annotations"]
    evit = gt_images(ds, Protocol.named("efficientvit"))
    kept = [a for im in evit for a in im.anns]
    assert len(kept) == sum(a["area"] >= 1 for a in anns) < len(anns)  # zero-area dropped
    assert any(a["iscrowd"] for a in kept)  # crowd included
    assert [im.image_id for im in evit] == sorted(im.image_id for im in evit)
    assert all([a["id"] for a in im.anns] == sorted(a["id"] for a in im.anns) for im in evit)
    edge = [a for im in gt_images(ds, Protocol.named("edgesam")) for a in im.anns]
    assert len(edge) == sum(a["area"] >= 1 and not a["iscrowd"] for a in anns)
    assert all(im.path == eval_coco / "val2017" / Path(im.path).name for im in evit)


def test_lvis_images_come_from_both_coco_splits(eval_coco: Path, eval_lvis: Path) -> None:
    ds = load_lvis(eval_lvis, eval_coco)
    images = gt_images(ds, Protocol())
    assert {im.path.parent.name for im in images} == {"train2017", "val2017"}
    assert all(im.path.is_file() and im.path.parent.parent == eval_coco for im in images)
    assert load_lvis(None, eval_coco, eval_lvis / "lvis_v1_val.json").ann_json == ds.ann_json
    with pytest.raises(ValueError, match="--lvis-root"):
        load_lvis(None, eval_coco)


def test_images_decode_as_stored(eval_coco: Path) -> None:
    """Grayscale and RGBA PNGs become RGB; the EXIF orientation tag is ignored, so the pixels
    and their size are the stored ones the annotations refer to."""
    ds = load_coco(eval_coco)
    seen = set()
    for item in gt_images(ds, Protocol()):
        loaded = load_item(ds, item, {256})
        with Image.open(item.path) as pil:
            seen.add(pil.mode)
            rotated = pil.getexif().get(EXIF_ORIENTATION) == 6
            seen |= {"exif"} if rotated else set()
            stored = np.asarray(pil.convert("RGB"))
        assert loaded.image.shape == (*item.hw, 3) and np.array_equal(loaded.image, stored)
        assert loaded.pre[256].orig_hw == item.hw
        if rotated:  # non-square: honouring the tag would have swapped height and width
            assert item.hw[0] != item.hw[1]
    assert seen >= {"L", "RGBA", "RGB", "exif"}


@pytest.fixture
def coco_copy(eval_coco: Path, tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(eval_coco, root)
    return root


def test_missing_image_is_named_or_skipped(coco_copy: Path) -> None:
    ds = load_coco(coco_copy)
    images = gt_images(ds, Protocol())
    images[2].path.unlink()
    with pytest.raises(FileNotFoundError, match=str(images[2].path)):
        split_missing(images, skip_missing=False)
    kept, missing = split_missing(images, skip_missing=True)
    assert missing == [str(images[2].path)] and len(kept) == len(images) - 1


def _rewrite(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_empty_dataset_is_an_error(coco_copy: Path) -> None:
    path = _coco_json(coco_copy)
    anns = json.loads(path.read_text())["annotations"]
    _rewrite(path, annotations=[a for a in anns if a["area"] < 1])
    with pytest.raises(ValueError, match="nothing to evaluate.*area >= 1"):
        gt_images(load_coco(coco_copy), Protocol())
    _rewrite(path, images=[], annotations=[])
    with pytest.raises(ValueError, match="nothing to evaluate: 0 images"):
        gt_images(load_coco(coco_copy), Protocol())
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a COCO/LVIS annotation file"):
        load_coco(coco_copy)
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match="instances_val2017.json: not valid JSON"):
        load_coco(coco_copy)
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        load_coco(coco_copy, split="train2017")


def test_size_mismatch_is_an_error(coco_copy: Path) -> None:
    path = _coco_json(coco_copy)
    images = json.loads(path.read_text())["images"]
    images[0]["height"] += 1
    _rewrite(path, images=images)
    ds = load_coco(coco_copy)
    item = gt_images(ds, Protocol())[0]
    with pytest.raises(ValueError, match=f"{item.path.name}: decoded size"):
        load_item(ds, item, {256})


def test_detections_are_checked(eval_coco: Path, tmp_path: Path) -> None:
    ds = load_coco(eval_coco)
    ok = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}
    cases = [
        ({"bad": 1}, "expected a list"),
        ([{"image_id": 1}], "lacks bbox, category_id, score"),
        ([dict(ok, image_id=999)], "image 999"),
        ([dict(ok, category_id=4)], "unknown category 4"),
    ]
    path = tmp_path / "dets.json"
    for content, match in cases:
        path.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=match):
            read_detections(path, ds)
    path.write_text(json.dumps([ok, dict(ok, score=0.1), dict(ok, image_id=3)]))
    images = det_images(ds, read_detections(path, ds))
    assert [im.image_id for im in images] == [1, 3]
    assert [i for i, _ in images[0].dets] == [0, 1] and images[1].dets[0][0] == 2
    with pytest.raises(FileNotFoundError, match="detections file not found"):
        read_detections(tmp_path / "none.json", ds)
    with pytest.raises(ValueError, match="detections file is empty"):
        det_images(ds, [])
