"""Photo scenes from scikit-image's bundled photographs: the split, determinism, sizes, exact
labels with occlusion, and the COCO and camouflage-domain writers read back by pycocotools and
teachers.mask_folders."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import socket
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from eval.scenes.photos import (
    HELD_PHOTOS,
    MIN_VISIBLE,
    SPLITS,
    TRAIN_PHOTOS,
    VAL_OFFSET,
    camouflage_layout,
    camouflage_scene,
    layout,
    make_camouflage_domain,
    make_photo_coco,
    photo,
    render,
    scene,
)
from eval.scenes.shapes import SHAPES
from teachers.mask_folders import Skips, list_pairs, load_pair

NUM = 20  # scenes per split in the property tests


@pytest.fixture(scope="module")
def layouts() -> dict[str, list]:
    return {split: [layout(split, i) for i in range(NUM)] for split in SPLITS}


def test_split_is_disjoint_and_every_photo_loads_without_the_network(monkeypatch):
    assert not set(TRAIN_PHOTOS) & set(HELD_PHOTOS)
    assert len(TRAIN_PHOTOS) == 11 and len(HELD_PHOTOS) == 7

    def refuse(*args, **kwargs):
        raise AssertionError("a photograph tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    photo.cache_clear()
    for name in TRAIN_PHOTOS + HELD_PHOTOS:
        img = photo(name)
        assert img.mode == "RGB" and min(img.size) >= 170, name
    # chelsea and cat are one file in scikit-image: only one of them may be used.
    assert "cat" not in TRAIN_PHOTOS + HELD_PHOTOS


def test_scene_is_a_pure_function_of_split_index_and_seed():
    image, labels = scene("held", 3)
    again = scene("held", 3)
    assert np.array_equal(image, again[0]) and np.array_equal(labels, again[1])
    assert image.dtype == np.uint8 and image.shape == (*labels.shape, 3)
    assert labels.dtype == np.int32
    for other in (scene("held", 4), scene("held", 3, seed=1), scene("train", 3)):
        assert other[0].shape != image.shape or not np.array_equal(other[0], image)


def test_sizes_and_aspects_vary_within_bounds():
    shapes = [scene("train", i, min_side=64, max_side=128)[1].shape for i in range(NUM)]
    for h, w in shapes:
        assert 64 <= max(h, w) <= 128
        assert 0.49 <= w / h <= 2.01  # 1:2 to 2:1, up to rounding of the short side
    aspects = [w / h for h, w in shapes]
    assert min(aspects) < 0.8 and max(aspects) > 1.25  # portrait and landscape
    assert len({round(a, 1) for a in aspects}) >= 5


def test_labels_are_the_visible_parts_of_the_shapes_in_painting_order(layouts):
    occluded = 0
    for scene_layout in layouts["train"] + layouts["held"]:
        hw, shapes = scene_layout.hw, scene_layout.shapes
        _, labels = render(scene_layout)
        assert 2 <= len(shapes) + scene_layout.num_dropped <= 8
        assert set(np.unique(labels)) - {0} == set(range(1, len(shapes) + 1))
        threshold = max(MIN_VISIBLE[0], MIN_VISIBLE[1] * hw[0] * hw[1])
        above = np.zeros(hw, bool)  # union of the shapes painted later
        for k in range(len(shapes), 0, -1):
            full = shapes[k - 1].full(hw)
            visible = labels == k
            assert np.array_equal(visible, full & ~above), k
            assert visible.sum() >= threshold
            # 1 % to 40 % of the image before occlusion (blobs keep their largest piece).
            assert 0.005 <= shapes[k - 1].mask.sum() / (hw[0] * hw[1]) <= 0.42
            occluded += int(visible.sum() < full.sum())
            above |= full
    assert occluded >= NUM // 2


def test_pixels_come_from_the_background_crop_and_each_objects_texture(layouts):
    for scene_layout in layouts["held"][:5]:
        image, labels = render(scene_layout)
        background, _ = render(dataclasses.replace(scene_layout, shapes=()))
        assert np.array_equal(image[labels == 0], background[labels == 0])
        for k, shape in enumerate(scene_layout.shapes, 1):
            alone, _ = render(dataclasses.replace(scene_layout, shapes=(shape,)))
            assert np.array_equal(image[labels == k], alone[labels == k])
            # Another photograph than the background's: the object shows.
            assert np.abs(alone[labels == k].astype(int) - background[labels == k]).mean() > 3


def test_held_scenes_use_only_held_photographs_and_all_shape_kinds(layouts):
    for split, names in SPLITS.items():
        for scene_layout in layouts[split]:
            assert scene_layout.photos <= set(names)
            assert all(s.photo != scene_layout.background for s in scene_layout.shapes)
        assert {s.kind for lay in layouts[split] for s in lay.shapes} == set(SHAPES)
    assert len({lay.background for lay in layouts["held"]}) >= 4


def test_camouflage_object_is_cut_from_its_own_background():
    for i in range(4):
        scene_layout = camouflage_layout("held", i)
        (shape,) = scene_layout.shapes
        assert shape.photo == scene_layout.background and scene_layout.photos <= set(HELD_PHOTOS)
        image, mask = camouflage_scene("held", i)
        assert mask.dtype == bool and np.array_equal(mask, shape.full(scene_layout.hw))
        assert 0.04 <= mask.mean() <= 0.3
        background, _ = render(dataclasses.replace(scene_layout, shapes=()))
        assert np.array_equal(image[~mask], background[~mask])
        assert (image[mask] != background[mask]).any(axis=-1).mean() > 0.5


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [
        float(xs.min()),
        float(ys.min()),
        float(xs.max() - xs.min() + 1),
        float(ys.max() - ys.min() + 1),
    ]


def test_make_photo_coco_annotations_decode_to_the_regenerated_labels(tmp_path: Path):
    path = make_photo_coco(tmp_path, "held", num_images=3, seed=5, min_side=96, max_side=160)
    make_photo_coco(tmp_path, "train", num_images=1, min_side=96, max_side=160)
    assert path == tmp_path / "annotations" / "instances_val2017.json"
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO(str(path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        scene_layout = layout("held", image_id - 1, seed=5, min_side=96, max_side=160)
        _, labels = render(scene_layout)
        with Image.open(tmp_path / "val2017" / info["file_name"]) as img:
            assert img.size == (info["width"], info["height"]) == labels.shape[::-1]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(scene_layout.shapes) >= 1
        for k, (ann, shape) in enumerate(zip(anns, scene_layout.shapes, strict=True), 1):
            mask = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert np.array_equal(mask, labels == k)
            assert ann["area"] == mask.sum() and ann["bbox"] == _bbox(mask)
            assert coco.loadCats(ann["category_id"])[0]["name"] == shape.kind
            assert ann["iscrowd"] == 0
    record = json.loads((tmp_path / "scenes.json").read_text())
    assert record["val2017"]["photos"] == list(HELD_PHOTOS) and record["val2017"]["seed"] == 5
    assert record["train2017"]["split"] == "train"
    assert (tmp_path / "train2017" / "000000000001.jpg").is_file()
    # teachers.mask_folders reads the root as COCO: one pair per instance of >= 64 pixels.
    areas = [a["area"] for a in coco.loadAnns(coco.getAnnIds())]
    skips = Skips()
    assert len(list_pairs(tmp_path, "val", on_bad="skip", skips=skips)) == sum(
        a >= 64 for a in areas
    )
    assert skips.counts["small"] == sum(a < 64 for a in areas)


def test_make_camouflage_domain_pairs_load_with_mask_data(tmp_path: Path):
    root = make_camouflage_domain(tmp_path, num_train=3, num_val=2, size=96)
    for split, num, offset in (("train", 3, 0), ("val", 2, VAL_OFFSET)):
        pairs = list_pairs(root, split)
        assert [p.name for p in pairs] == [f"{split}_{i:05d}" for i in range(num)]
        for i, pair in enumerate(pairs):
            image, mask = load_pair(pair)
            assert pair.image.suffix == ".jpg" and max(image.shape[:2]) == 96
            assert np.array_equal(mask, camouflage_scene("held", offset + i, 0, 96, 96)[1])
    params = json.loads((root / "domain.json").read_text())
    assert params["photos"] == list(HELD_PHOTOS) and params["num_val"] == 2


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda root: scene("val", 0), "split"),
        (lambda root: scene("train", -1), "index"),
        (lambda root: scene("train", 0, seed=-2), "seed"),
        (lambda root: scene("train", 0, min_side=16, max_side=64), "min_side"),
        (lambda root: scene("train", 0, min_side=300, max_side=200), "max_side"),
        (lambda root: camouflage_scene("test", 0), "split"),
        (lambda root: photo("cat"), "photo"),
        (lambda root: make_photo_coco(root, num_images=0), "num_images"),
        (lambda root: make_photo_coco(root, split="val"), "split"),
        (lambda root: make_camouflage_domain(root, 0, 0), "num_train"),
        (lambda root: make_camouflage_domain(root, size=16), "size"),
        (lambda root: make_camouflage_domain(root, image_suffix=".bmp"), "image_suffix"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(tmp_path: Path, call, name: str):
    with pytest.raises(ValueError, match=name):
        call(tmp_path)
    assert not any(tmp_path.iterdir())  # checked before anything is written
