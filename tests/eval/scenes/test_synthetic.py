"""The synthetic COCO/LVIS generator: determinism, layout, exact masks, special cases, and
perfect-detection AP through the official evaluators."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from lvis import LVIS, LVISEval, LVISResults
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eval.scenes.synthetic import (
    CATEGORIES,
    DOT,
    EXIF_ORIENTATION,
    LINE,
    TEXTURE,
    instance_masks,
    make_coco,
    make_lvis,
    scene,
    uncompressed_rle,
)

SHAPES = {c[0] for c in CATEGORIES} - {DOT, LINE}


@pytest.fixture(scope="module")
def coco_root(eval_coco: Path) -> Path:
    """The default generated COCO root, shared with the other eval tests (tests/eval/conftest.py)."""
    return eval_coco


@pytest.fixture(scope="module")
def coco_json(coco_root: Path) -> Path:
    return coco_root / "annotations" / "instances_val2017.json"


@pytest.fixture(scope="module")
def dataset(coco_json: Path) -> dict:
    return json.loads(coco_json.read_text())


@pytest.fixture(scope="module")
def lvis_json(eval_lvis: Path) -> Path:
    # make_lvis beside the COCO root, as LVIS images really live in COCO's folders.
    return eval_lvis / "lvis_v1_val.json"


def _quiet(fn, *args):
    # pycocotools prints progress on stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _by_image(dataset: dict) -> dict[int, list[dict]]:
    anns = {img["id"]: [] for img in dataset["images"]}
    for ann in dataset["annotations"]:
        anns[ann["image_id"]].append(ann)
    return anns


def test_same_seed_same_files_and_more_images_change_none(tmp_path: Path) -> None:
    a, b = make_coco(tmp_path / "a", num_images=4), make_coco(tmp_path / "b", num_images=5)
    c = make_coco(tmp_path / "c", num_images=4, seed=1)
    assert json.loads(c.read_text())["annotations"] != json.loads(a.read_text())["annotations"]
    images_a, images_b = json.loads(a.read_text())["images"], json.loads(b.read_text())["images"]
    assert images_b[:4] == images_a
    for img in images_a:
        data = (tmp_path / "a" / "val2017" / img["file_name"]).read_bytes()
        assert data == (tmp_path / "b" / "val2017" / img["file_name"]).read_bytes()
    again = make_coco(tmp_path / "a2", num_images=4)
    assert again.read_text() == a.read_text()


def test_images_have_sizes_modes_and_exif(coco_root: Path, dataset: dict) -> None:
    kinds, orientations, shapes = Counter(), {}, set()
    for img in dataset["images"]:
        h, w = img["height"], img["width"]
        with Image.open(coco_root / "val2017" / img["file_name"]) as pil:
            assert pil.size == (w, h)  # the stored grid, EXIF or not
            kinds[pil.format, pil.mode] += 1
            orientations[img["file_name"]] = pil.getexif().get(EXIF_ORIENTATION)
            if pil.mode == "RGBA":
                assert np.all(np.asarray(pil)[..., 3] == 255)
        assert min(h, w) >= 48 and max(h, w) <= 160
        assert max(h, w) / min(h, w) >= 1.2
        shapes.add("portrait" if h > w else "landscape")
    assert kinds == {("JPEG", "RGB"): 4, ("PNG", "L"): 2, ("PNG", "RGBA"): 2}
    assert {k: v for k, v in orientations.items() if v} == {"000000000004.jpg": 6}
    assert shapes == {"portrait", "landscape"}


def test_stored_pixels_are_the_painted_scene(coco_root: Path, dataset: dict) -> None:
    for i, img in enumerate(dataset["images"]):
        with Image.open(coco_root / "val2017" / img["file_name"]) as pil:
            stored = np.asarray(pil).astype(int)
        painted, _ = scene(0, i, 48, 160, 1 if stored.ndim == 2 else 3)
        painted = painted[..., 0] if stored.ndim == 2 else painted
        if img["file_name"].endswith(".png"):
            assert np.array_equal(stored[..., :3] if stored.ndim == 3 else stored, painted)
        else:  # JPEG at quality 95, pixels not rotated despite any EXIF tag
            assert stored.shape == painted.shape and np.abs(stored - painted).mean() < 4.0


def test_masks_are_what_pycocotools_decodes(coco_json: Path, dataset: dict) -> None:
    coco = _quiet(COCO, str(coco_json))
    masks = instance_masks(coco_json)
    for ann in dataset["annotations"]:
        mask = coco.annToMask(coco.anns[ann["id"]]).astype(bool)
        assert np.array_equal(mask, masks[ann["id"]])
        assert ann["area"] == mask.sum()
        if ann["area"] > 0:
            assert ann["bbox"] == mask_utils.toBbox(_rle(mask)).tolist()
    for i, anns in enumerate(_by_image(dataset).values()):
        _, instances = scene(0, i, 48, 160, 3)
        assert len(instances) == len(anns)
        for inst, ann in zip(instances, anns, strict=True):
            assert np.array_equal(inst.visible, masks[ann["id"]])
            whole = np.array_equal(inst.visible, inst.full) and not inst.iscrowd
            assert isinstance(ann["segmentation"], list) == whole  # else RLE of the visible part
        assert max(np.sum([masks[a["id"]] for a in anns], 0).ravel()) == 1  # visible: disjoint


def test_pixels_painted_through_exactly_the_visible_mask(coco_root: Path, dataset: dict) -> None:
    # Lossless images only: inside a mask every pixel is its colour +- texture, and every pixel
    # bordering it from outside has another colour, so no mask pixel is missing or extra.
    masks = instance_masks(coco_root / "annotations" / "instances_val2017.json")
    images = {img["id"]: img for img in dataset["images"]}
    checked = 0
    for image_id, anns in _by_image(dataset).items():
        if not images[image_id]["file_name"].endswith(".png"):
            continue
        with Image.open(coco_root / "val2017" / images[image_id]["file_name"]) as pil:
            pixels = np.asarray(pil.convert("RGB")).astype(int)
        for ann in (a for a in anns if a["area"] > 0):
            mask = masks[ann["id"]]
            grown = mask.copy()
            grown[1:] |= mask[:-1]
            grown[:-1] |= mask[1:]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            colour = np.median(pixels[mask], 0)
            assert np.abs(pixels[mask] - colour).max() <= 2 * TEXTURE
            assert np.all(np.abs(pixels[grown & ~mask] - colour).max(1) > 2 * TEXTURE)
            checked += 1
    assert checked >= 20


def test_every_image_has_overlapping_shapes(dataset: dict) -> None:
    for i in range(len(dataset["images"])):
        _, instances = scene(0, i, 48, 160, 3)
        shapes = [x.full for x in instances if x.category_id in SHAPES]
        assert len(shapes) >= 2
        assert any((a & b).any() for a, b in itertools.combinations(shapes, 2))
    rles = [a for a in dataset["annotations"] if isinstance(a["segmentation"], dict)]
    assert sum(a["category_id"] in SHAPES for a in rles if not a["iscrowd"]) >= 8


def test_segmentation_formats_and_special_cases(dataset: dict) -> None:
    sizes = {img["id"]: (img["height"], img["width"]) for img in dataset["images"]}
    anns = dataset["annotations"]
    crowd = [a for a in anns if a["iscrowd"]]
    assert [a["image_id"] for a in crowd] == [1, 4, 7]  # images with index % 3 == 0
    for ann in crowd:
        counts, (h, w) = ann["segmentation"]["counts"], sizes[ann["image_id"]]
        assert isinstance(counts, list) and all(isinstance(c, int) for c in counts)
        assert sum(counts) == h * w and ann["segmentation"]["size"] == [h, w]
        assert ann["category_id"] == DOT and ann["area"] > 0
    kinds = Counter(
        "polygon" if isinstance(a["segmentation"], list) else "rle"
        for a in anns
        if not a["iscrowd"]
    )
    assert kinds["polygon"] >= 15 and kinds["rle"] >= 15
    for ann in anns:
        segm = ann["segmentation"]
        if not ann["iscrowd"] and isinstance(segm, dict):
            assert isinstance(segm["counts"], str)
        elif not ann["iscrowd"]:
            assert len(segm) == 1 and len(segm[0]) % 2 == 0 and len(segm[0]) >= 6
    tiny = [a for a in anns if 1 <= a["area"] <= 6]
    assert len(tiny) >= 12 and {a["area"] for a in tiny} >= {1.0, 2.0, 3.0}
    zero = [a for a in anns if a["area"] == 0]
    assert [(a["image_id"], a["category_id"]) for a in zero] == [(2, LINE), (6, LINE)]
    for ann in zero:
        assert ann["bbox"][2] == 0 and ann["bbox"][3] > 0  # a degenerate box, as drawn
        assert isinstance(ann["segmentation"], list)
    assert {c["id"] for c in dataset["categories"]} == {1, 2, 3, 5, 7, 9}


def test_uncompressed_rle_round_trips() -> None:
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 5)) < 0.4, np.ones((3, 4), bool), np.zeros((4, 3), bool)):
        rle = uncompressed_rle(mask)
        decoded = mask_utils.decode(mask_utils.frPyObjects(rle, *mask.shape)).astype(bool)
        assert np.array_equal(decoded, mask)
    assert uncompressed_rle(np.array([[True], [False]]))["counts"] == [0, 1, 1]


def _coco_ap(gt: COCO, anns: list[dict]) -> np.ndarray:
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0}
        | {"segmentation": _rle(gt.annToMask(a))}
        for a in anns
    ]
    ev = COCOeval(gt, _quiet(gt.loadRes, dets), "segm")
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    return ev.stats


def test_coco_eval_perfect_detections(coco_json: Path, dataset: dict, tmp_path: Path) -> None:
    gt = _quiet(COCO, str(coco_json))
    anns = [a for a in dataset["annotations"] if not a["iscrowd"] and a["area"] > 0]
    stats = _coco_ap(gt, anns)
    # The 'line' category holds only the zero-area annotations: COCOeval keeps them (area 0 is
    # inside [0, 1e10]) but no mask can match an empty one (IoU 0), so 'line' scores AP 0 and the
    # mean over 6 categories is 5/6. Small AP drops likewise; there are no large objects (-1).
    assert stats[:6] == pytest.approx([5 / 6, 5 / 6, 5 / 6, 5 / 6, 1.0, -1.0])
    # With area >= 1, as the evaluation protocol prompts, perfect masks score 1.0 everywhere.
    kept = dict(dataset, annotations=[a for a in dataset["annotations"] if a["area"] >= 1])
    (tmp_path / "kept.json").write_text(json.dumps(kept))
    stats = _coco_ap(_quiet(COCO, str(tmp_path / "kept.json")), anns)
    assert stats[:6] == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.0, -1.0])


def test_lvis_layout_and_fields(coco_root: Path, lvis_json: Path) -> None:
    lvis = LVIS(str(lvis_json))
    masks = instance_masks(lvis_json)
    assert lvis_json == coco_root.parent / "lvis" / "lvis_v1_val.json"
    assert len(lvis.imgs) == 8 and min(lvis.imgs) == 100_000
    splits, modes = Counter(), Counter()
    for img in lvis.imgs.values():
        assert img["coco_url"].startswith("http://images.cocodataset.org/")
        split, name = img["coco_url"].split("/")[-2:]
        with Image.open(coco_root / split / name) as pil:
            assert pil.size == (img["width"], img["height"]) and pil.format == "JPEG"
            modes[pil.mode] += 1
        splits[split] += 1
        annotated = {a["category_id"] for a in lvis.img_ann_map[img["id"]]}
        assert not annotated & set(img["neg_category_ids"])
        assert not set(img["not_exhaustive_category_ids"]) & set(img["neg_category_ids"])
    assert splits == {"val2017": 4, "train2017": 4} and modes == {"RGB": 6, "L": 2}
    assert len(list((coco_root / "val2017").glob("00000000000*"))) == 8  # make_coco's survive
    assert any(img["not_exhaustive_category_ids"] for img in lvis.imgs.values())
    for ann in lvis.anns.values():
        assert "iscrowd" not in ann and isinstance(ann["segmentation"], list) and ann["area"] > 0
        mask = lvis.ann_to_mask(ann).astype(bool)
        assert np.array_equal(mask, masks[ann["id"]]) and ann["area"] == mask.sum()
        assert ann["bbox"] == mask_utils.toBbox(_rle(mask)).tolist()
    for cat in lvis.cats.values():
        anns = [a for a in lvis.anns.values() if a["category_id"] == cat["id"]]
        assert cat["instance_count"] == len(anns)
        assert cat["image_count"] == len({a["image_id"] for a in anns})
        assert cat["synset"].endswith(".n.01") and cat["frequency"] in "rcf"
    assert {c["frequency"] for c in lvis.cats.values()} == {"r", "c", "f"}


def test_lvis_eval_perfect_detections(lvis_json: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # lvis 0.5.3 (the latest release) still calls np.float, removed in NumPy 1.24.
    monkeypatch.setattr(np, "float", float, raising=False)
    gt = LVIS(str(lvis_json))
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0}
        | {"segmentation": _rle(gt.ann_to_mask(a))}
        for a in gt.anns.values()
    ]
    ev = LVISEval(gt, LVISResults(gt, dets), "segm")
    ev.run()
    # Every category with annotations scores 1.0; 'line' has none in LVIS (zero area) and counts
    # as absent (-1), which LVISEval leaves out of the means. No object is large.
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
    assert [ev.results[k] for k in keys] == pytest.approx([1, 1, 1, 1, 1, -1, 1, 1, 1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_images": 0}, "num_images"), ({"min_side": 100, "max_side": 90}, "min_side")],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_coco(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=match):
        make_lvis(tmp_path / "lvis", tmp_path / "coco", **kwargs)
