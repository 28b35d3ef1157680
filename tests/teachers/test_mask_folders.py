"""The binary-mask folder reader (teachers.mask_folders) and the synthetic camouflage domain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from scipy.ndimage import binary_erosion

from eval.prompts import box_xyxy
from eval.scenes.domain import domain_as_coco, domain_sample, make_domain
from teachers.mask_folders import (
    DuplicateStemError,
    EmptyMaskError,
    MaskPair,
    MaskSizeError,
    MissingImageError,
    MissingMaskError,
    NonBinaryMaskError,
    Skips,
    UnreadableFileError,
    full_image_box,
    iter_pairs,
    list_pairs,
    load_pair,
    mask_box,
)


def _disc(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2


def _write(path: Path, array: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def _pair(root: Path, name: str, hw=(24, 32), mask=None, mask_ext=".png") -> None:
    rng = np.random.default_rng(len(name))
    _write(
        root / "val/images" / f"{name}.jpg", rng.integers(0, 256, (*hw, 3), dtype=np.uint8), "JPEG"
    )
    mask = _disc(*hw).astype(np.uint8) * 255 if mask is None else mask
    fmt = {".png": "PNG", ".bmp": "BMP", ".jpg": "JPEG"}[mask_ext]
    _write(root / "val/masks" / f"{name}{mask_ext}", mask, fmt)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """val/ with good pairs (png, bmp and jpg masks) and one of each bad case."""
    _pair(tmp_path, "good_png")
    _pair(tmp_path, "good_bmp", mask_ext=".bmp")
    _pair(tmp_path, "good_jpg", mask_ext=".jpg")
    soft = (_disc(24, 32) * 255).astype(np.uint8)
    soft[::2, ::2] = 40  # 25 % of the pixels gray: a soft map
    _pair(tmp_path, "bad_gray", mask=soft)
    _pair(tmp_path, "bad_size", mask=np.full((20, 32), 255, np.uint8))
    _pair(tmp_path, "bad_empty", mask=np.zeros((24, 32), np.uint8))
    _write(tmp_path / "val/images/no_mask.png", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / "val/masks/no_image.png", np.zeros((8, 8), np.uint8))
    _pair(tmp_path, "broken")
    (tmp_path / "val/masks/broken.png").write_bytes(b"not a png")
    (tmp_path / "val/images/.DS_Store").write_bytes(b"x")
    (tmp_path / "val/masks/notes.txt").write_text("ignored")
    return tmp_path


BAD_LOAD = {
    "bad_gray": NonBinaryMaskError,
    "bad_size": MaskSizeError,
    "bad_empty": EmptyMaskError,
    "broken": UnreadableFileError,
}


def test_list_pairs_stops_on_a_missing_mask(folder: Path) -> None:
    with pytest.raises(MissingImageError, match="no_image.png"):  # orphan masks come first
        list_pairs(folder, "val")
    (folder / "val/masks/no_image.png").unlink()
    with pytest.raises(MissingMaskError, match="no_mask.png"):
        list_pairs(folder, "val")


def test_list_pairs_skips_and_counts_name_problems(folder: Path) -> None:
    skips = Skips()
    pairs = list_pairs(folder, "val", on_bad="skip", skips=skips)
    assert [p.name for p in pairs] == sorted(["good_png", "good_bmp", "good_jpg", *BAD_LOAD])
    assert dict(skips.counts) == {"no_mask": 1, "no_image": 1}
    assert {(p.name, r) for p, r, _ in skips.entries} == {
        ("no_mask.png", "no_mask"),
        ("no_image.png", "no_image"),
    }
    assert skips.summary() == "2 skipped: 1 no_image, 1 no_mask"


def test_duplicate_stem(folder: Path) -> None:
    _write(folder / "val/images/good_png.png", np.zeros((24, 32, 3), np.uint8))
    skips = Skips()
    names = [p.name for p in list_pairs(folder, "val", on_bad="skip", skips=skips)]
    assert "good_png" not in names and skips.counts["duplicate"] == 1
    with pytest.raises(DuplicateStemError, match="good_png.jpg, good_png.png"):
        list_pairs(folder, "val")


@pytest.mark.parametrize("name", sorted(BAD_LOAD))
def test_load_pair_named_errors(folder: Path, name: str) -> None:
    pair = next(p for p in list_pairs(folder, "val", on_bad="skip") if p.name == name)
    with pytest.raises(BAD_LOAD[name], match=name):
        load_pair(pair)
    with pytest.raises(BAD_LOAD[name]):
        list(iter_pairs([pair], on_bad="stop"))


def test_iter_pairs_skips_bad_pixels_with_reasons(folder: Path) -> None:
    skips = Skips()
    pairs = list_pairs(folder, "val", on_bad="skip", skips=skips)
    loaded = {
        p.name: (image, mask) for p, image, mask in iter_pairs(pairs, on_bad="skip", skips=skips)
    }
    assert sorted(loaded) == ["good_bmp", "good_jpg", "good_png"]
    assert dict(skips.counts) == {
        "no_mask": 1,
        "no_image": 1,
        "non_binary": 1,
        "size_mismatch": 1,
        "empty_mask": 1,
        "unreadable": 1,
    }
    assert skips.num_skipped == 6
    disc = _disc(24, 32)
    for name in ("good_png", "good_bmp"):
        image, mask = loaded[name]
        assert image.dtype == np.uint8 and image.shape == (24, 32, 3)
        assert mask.dtype == bool and np.array_equal(mask, disc)
    # JPEG masks are thresholded at 128: compression noise does not change the disc.
    assert np.array_equal(loaded["good_jpg"][1], disc)


def test_edge_cases_of_binarisation(tmp_path: Path) -> None:
    disc = _disc(40, 40)
    aa = disc.astype(np.uint8) * 255
    aa[0, :16] = [60, 200] * 8  # 1 % anti-aliased pixels: tolerated, > 128 is foreground
    _pair(tmp_path, "aa", hw=(40, 40), mask=aa)
    _pair(tmp_path, "labels01", hw=(40, 40), mask=disc.astype(np.uint8))
    _pair(tmp_path, "empty", hw=(40, 40), mask=np.zeros((40, 40), np.uint8))
    pairs = {p.name: p for p in list_pairs(tmp_path, "val")}
    expected = disc.copy()
    expected[0, 1:16:2] = True
    assert np.array_equal(load_pair(pairs["aa"])[1], expected)
    assert np.array_equal(load_pair(pairs["labels01"])[1], disc)
    assert not load_pair(pairs["empty"], allow_empty=True)[1].any()


def test_missing_split_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=str(tmp_path / "train")):
        list_pairs(tmp_path, "train")
    (tmp_path / "train/images").mkdir(parents=True)
    with pytest.raises(ValueError, match="train/masks"):
        list_pairs(tmp_path, "train")
    with pytest.raises(ValueError, match="on_bad"):
        list_pairs(tmp_path, "train", on_bad="ignore")


def test_unreadable_image(tmp_path: Path) -> None:
    _pair(tmp_path, "a")
    (tmp_path / "val/images/a.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(UnreadableFileError, match="a.jpg"):
        load_pair(list_pairs(tmp_path, "val")[0])
    with pytest.raises(UnreadableFileError):
        load_pair(MaskPair("gone", tmp_path / "gone.jpg", tmp_path / "gone.png"))


def test_mask_box() -> None:
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True  # rows 2..4, columns 3..8
    assert mask_box(mask) == [3.0, 2.0, 9.0, 5.0]
    single = np.zeros((4, 4), bool)
    single[3, 0] = True
    assert mask_box(single) == [0.0, 3.0, 1.0, 4.0]
    blob = _disc(17, 23) | (np.arange(23) == 20)[None, :] & (np.arange(17) == 1)[:, None]
    bbox = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(blob, dtype=np.uint8)))
    assert mask_box(blob) == box_xyxy(bbox)  # the convention of the COCO eval's GT boxes
    assert full_image_box((24, 32)) == [0.0, 0.0, 32.0, 24.0]
    with pytest.raises(ValueError, match="empty"):
        mask_box(np.zeros((3, 3), bool))


def test_make_domain_layout_and_determinism(tmp_path: Path) -> None:
    a = make_domain(tmp_path / "a", num_train=4, num_val=2, seed=3, size=64)
    b = make_domain(tmp_path / "b", num_train=4, num_val=2, seed=3, size=64)
    make_domain(tmp_path / "c", num_train=4, num_val=2, seed=4, size=64)
    for split, num in (("train", 4), ("val", 2)):
        skips = Skips()
        pairs = list_pairs(a, split, on_bad="skip", skips=skips)
        assert len(pairs) == num
        for pair, image, mask in iter_pairs(pairs, on_bad="stop"):
            twin = b / split / "images" / pair.image.name
            assert pair.image.read_bytes() == twin.read_bytes()
            assert np.array_equal(
                mask, load_pair(MaskPair(pair.name, twin, b / split / "masks" / pair.mask.name))[1]
            )
            assert (
                image.shape[:2]
                == mask.shape
                == ((64, 64) if int(pair.name[-1]) % 2 == 0 else (48, 64))
            )
        assert skips.num_skipped == 0
    other = tmp_path / "c/train/images/train_00000.png"
    assert other.read_bytes() != (a / "train/images/train_00000.png").read_bytes()


def test_domain_masks_are_exact_binary_and_nonempty(tmp_path: Path) -> None:
    root = make_domain(tmp_path, num_train=3, num_val=3, seed=0, size=96)
    for split in ("train", "val"):
        for i, pair in enumerate(list_pairs(root, split)):
            raw = np.asarray(Image.open(pair.mask))
            assert raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 255}
            pixels, mask = domain_sample(0, split, i, 96)
            image, loaded = load_pair(pair)
            assert np.array_equal(loaded, mask) and np.array_equal(image, pixels)
            assert 0.02 < mask.mean() < 0.5


# The object is camouflaged: per-channel mean colour inside and outside differs by under
# MAX_MEAN_GAP gray levels and the std by under MAX_STD_GAP, while the high-frequency energy (mean
# squared difference of horizontal neighbours, 3 pixels away from the boundary) differs by more
# than MIN_ENERGY_RATIO times.
MAX_MEAN_GAP, MAX_STD_GAP, MIN_ENERGY_RATIO = 1.0, 1.0, 4.0


@pytest.mark.parametrize("index", range(6))
def test_domain_object_is_camouflaged(index: int) -> None:
    pixels, mask = domain_sample(7, "train", index, 128)
    x = pixels.astype(np.float64)
    inside, outside = x[mask], x[~mask]
    assert np.abs(inside.mean(0) - outside.mean(0)).max() < MAX_MEAN_GAP
    assert np.abs(inside.std(0) - outside.std(0)).max() < MAX_STD_GAP
    energy = np.zeros(mask.shape)
    energy[:, :-1] = (np.diff(x, axis=1) ** 2).mean(-1)
    core_in, core_out = binary_erosion(mask, iterations=3), binary_erosion(~mask, iterations=3)
    core_out[:, -1] = False
    assert energy[core_in].mean() > MIN_ENERGY_RATIO * energy[core_out].mean()


def test_make_domain_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        make_domain(tmp_path, size=8)
    with pytest.raises(ValueError, match="num_train"):
        make_domain(tmp_path, num_train=0, num_val=0)
    with pytest.raises(ValueError, match="image_suffix"):
        make_domain(tmp_path, image_suffix=".gif")


def test_coco_instances_are_a_second_source(tmp_path):
    from pycocotools.coco import COCO

    from eval.scenes.synthetic import make_coco
    from teachers.mask_folders import MIN_INSTANCE_AREA

    ann_file = make_coco(tmp_path, split="train2017", num_images=6, seed=1)
    skips = Skips()
    pairs = list_pairs(tmp_path, "train", on_bad="skip", skips=skips)
    api = COCO(str(ann_file))
    anns = api.loadAnns(api.getAnnIds())
    kept = [a for a in anns if not a["iscrowd"] and a["area"] >= MIN_INSTANCE_AREA]
    assert len(pairs) == len(kept) > 0
    assert skips.counts["crowd"] == sum(bool(a["iscrowd"]) for a in anns) > 0
    assert skips.num_skipped == len(anns) - len(kept)
    for pair, ann in zip(pairs, kept, strict=True):
        image, mask = load_pair(pair)
        np.testing.assert_array_equal(mask, api.annToMask(ann).astype(bool))  # the official API
        assert image.shape[:2] == mask.shape and pair.name.endswith(f"_ann{ann['id']}")
    with pytest.raises(ValueError, match="crowd region"):
        list_pairs(tmp_path, "train")


def test_domain_as_coco_is_one_exact_instance_per_image(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    make_domain(tmp_path / "d", num_train=3, num_val=1, seed=4, size=64)
    path = domain_as_coco(tmp_path / "d", "train", tmp_path / "coco")
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [1, 2, 3] and len(coco.getAnnIds()) == 3
    for image in coco.loadImgs(coco.getImgIds()):
        name = image["file_name"]
        src = tmp_path / "d" / "train"
        assert (tmp_path / "coco" / "val2017" / name).read_bytes() == (
            src / "images" / name
        ).read_bytes()
        (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        truth = np.asarray(Image.open(src / "masks" / name)) > 0
        assert (image["height"], image["width"]) == truth.shape
        assert np.array_equal(coco.annToMask(ann).astype(bool), truth)
        ys, xs = np.nonzero(truth)
        x0, y0 = xs.min(), ys.min()
        assert ann["bbox"] == [x0, y0, xs.max() + 1 - x0, ys.max() + 1 - y0]
        assert ann["area"] == truth.sum() and ann["iscrowd"] == 0
    with pytest.raises(ValueError, match=r"mask dataset folder not found: .*d/test"):
        domain_as_coco(tmp_path / "d", "test", tmp_path / "none")
