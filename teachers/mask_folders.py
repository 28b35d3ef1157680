"""Reader for binary-mask segmentation folders, the layout COD10K, CAMO, ISTD, Kvasir-SEG and ISIC
ship in (after the usual renaming of their folders)::

    ROOT/train/images/NAME.jpg|.jpeg|.png|.bmp     ROOT/train/masks/NAME.png|.bmp|.jpg|.jpeg
    ROOT/val/images/...                           ROOT/val/masks/...

Images and masks are matched by file stem. A mask is read as 8-bit gray (PIL `convert("L")`, so
RGB masks such as Kvasir-SEG's work) and a pixel is foreground when its value is > 128, the rule
`py_sod_metrics.utils.prepare_data` applies to ground truth. A mask whose values are all 0 or 1
is read as 0/1 labels. Which masks count as binary:

* lossless masks (.png, .bmp): at most `GRAY_FRACTION` (2 %) of the pixels may hold a value other
  than 0 and 255, which allows anti-aliased edges and nothing like a soft or probability map;
* JPEG masks (Kvasir-SEG ships them) always carry compression noise near 0 and 255, so they are
  thresholded at 128 and only values in the ambiguous band `JPEG_GRAY` (32..223) count against
  the same 2 %.

COCO instance annotations are a second source: when `ROOT/annotations/instances_{split}2017.json`
(or `instances_{split}.json`) exists, every non-crowd instance of at least `MIN_INSTANCE_AREA`
pixels is one pair, its image in `ROOT/{split}2017/` (or `ROOT/{split}/`) and its mask rasterised
from the annotation by `pycocotools.mask` (polygons merged, RLE decoded); crowd and smaller
instances are counted as skips (`crowd`, `small`). Such pairs need a ground-truth box prompt: an
image holds several instances.

`prompt_box` gives a sample's box prompt (the mask's box or the whole image), the one the adapt job
trains and validates with and `eval/masks.py` scores with.

Bad input is a named `MaskDataError` (a ValueError) with `on_bad="stop"`, or a skip counted in a
`Skips` with its reason under `on_bad="skip"`. Image pixels are used as stored (the EXIF tag is
ignored), like `teachers.preprocess.decode_image`, which reads them.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from teachers.preprocess import decode_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
MASK_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg")
JPEG_SUFFIXES = (".jpg", ".jpeg")
FOREGROUND_ABOVE = 128
GRAY_FRACTION = 0.02
JPEG_GRAY = (32, 223)
ON_BAD = ("stop", "skip")
MIN_INSTANCE_AREA = 64  # pixels; smaller COCO instances are skipped


class MaskDataError(ValueError):
    """A bad image/mask pair; `reason` is the short name under which it is counted as a skip."""

    reason = "bad"

    def __init__(self, path: Path | str, message: str | None = None) -> None:
        # One argument: an already formatted message (how a DataLoader worker's error is raised
        # again in the main process).
        super().__init__(f"{path}: {message}" if message is not None else str(path))
        self.path = path


class MissingMaskError(MaskDataError):
    reason = "no_mask"


class MissingImageError(MaskDataError):
    reason = "no_image"


class DuplicateStemError(MaskDataError):
    reason = "duplicate"


class UnreadableFileError(MaskDataError):
    reason = "unreadable"


class MaskSizeError(MaskDataError):
    reason = "size_mismatch"


class NonBinaryMaskError(MaskDataError):
    reason = "non_binary"


class EmptyMaskError(MaskDataError):
    reason = "empty_mask"


class CrowdInstanceError(MaskDataError):
    reason = "crowd"


class SmallInstanceError(MaskDataError):
    reason = "small"


@dataclass(frozen=True)
class MaskPair:
    """One sample: its `name`, the image file and the mask file; for a COCO instance, `mask` is
    the annotation file and `coco` the instance's {"segmentation", "height", "width"}."""

    name: str
    image: Path
    mask: Path
    coco: dict | None = field(default=None, hash=False, compare=False)


@dataclass
class Skips:
    """Pairs left out under `on_bad="skip"`: `counts[reason]` and every (path, reason, message)."""

    counts: Counter = field(default_factory=Counter)
    entries: list[tuple[Path, str, str]] = field(default_factory=list)

    def add(self, err: MaskDataError) -> None:
        self.counts[err.reason] += 1
        self.entries.append((err.path, err.reason, str(err)))
        log.warning("skipped %s", err)

    @property
    def num_skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """'3 skipped: 2 no_mask, 1 empty_mask' (or '0 skipped')."""
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"{self.num_skipped} skipped" + (f": {parts}" if parts else "")


def _check_on_bad(on_bad: str) -> None:
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad={on_bad!r}: choose one of {', '.join(ON_BAD)}")


def _handle(err: MaskDataError, on_bad: str, skips: Skips | None) -> None:
    if on_bad == "stop":
        raise err
    if skips is not None:
        skips.add(err)


def _by_stem(folder: Path, suffixes: tuple[str, ...], on_bad: str, skips: Skips | None) -> dict:
    """{stem: path} of the files in `folder` with one of `suffixes` (any case); hidden files and
    other suffixes are ignored. Two files with one stem are ambiguous: both are left out."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in suffixes:
            found.setdefault(path.stem, []).append(path)
    for stem, paths in found.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            _handle(
                DuplicateStemError(folder / stem, f"several files share the stem: {names}"),
                on_bad,
                skips,
            )
    return {stem: paths[0] for stem, paths in found.items() if len(paths) == 1}


def _split_dirs(root: str | Path, split: str) -> tuple[Path, Path]:
    split_dir = Path(root) / split
    for path in (split_dir, split_dir / "images", split_dir / "masks"):
        if not path.is_dir():
            raise ValueError(
                f"mask dataset folder not found: {path} (expected ROOT/{split}/images and "
                f"ROOT/{split}/masks, the COD10K/CAMO/ISTD/Kvasir layout, or COCO's "
                f"ROOT/annotations/instances_{split}2017.json)"
            )
    return split_dir / "images", split_dir / "masks"


def coco_split(root: str | Path, split: str) -> tuple[Path, Path] | None:
    """(annotation file, image folder) when `root` holds COCO instance annotations for `split`."""
    for name in (f"{split}2017", split):
        path = Path(root) / "annotations" / f"instances_{name}.json"
        if path.is_file():
            return path, Path(root) / name
    return None


def coco_pairs(
    ann_file: Path, image_dir: Path, on_bad: str = "stop", skips: Skips | None = None
) -> list[MaskPair]:
    """One pair per non-crowd COCO instance of at least `MIN_INSTANCE_AREA` pixels, by id."""
    try:
        gt = json.loads(ann_file.read_text())
        images = {img["id"]: img for img in gt["images"]}
        anns = sorted(gt["annotations"], key=lambda a: a["id"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{ann_file}: not a readable COCO annotation file ({err})") from err
    pairs = []
    for ann in anns:
        img = images.get(ann["image_id"])
        if img is None:
            raise ValueError(
                f"{ann_file}: annotation {ann['id']} names image {ann['image_id']}, which is not listed"
            )
        name = f"{Path(img['file_name']).stem}_ann{ann['id']}"
        if ann.get("iscrowd"):
            _handle(
                CrowdInstanceError(ann_file, f"annotation {ann['id']} is a crowd region"),
                on_bad,
                skips,
            )
            continue
        if ann.get("area", 0) < MIN_INSTANCE_AREA:
            message = (
                f"annotation {ann['id']} has {ann.get('area', 0):g} pixels (< {MIN_INSTANCE_AREA})"
            )
            _handle(SmallInstanceError(ann_file, message), on_bad, skips)
            continue
        coco = {"segmentation": ann["segmentation"], "height": img["height"], "width": img["width"]}
        pairs.append(MaskPair(name, image_dir / img["file_name"], ann_file, coco))
    return pairs


def list_pairs(
    root: str | Path, split: str, *, on_bad: str = "stop", skips: Skips | None = None
) -> list[MaskPair]:
    """The image/mask pairs of `root/split`, sorted by name (COCO instances: by annotation id).
    Checks only what the file names show (an image without a mask, a mask without an image, a
    duplicate stem); `load_pair` or `iter_pairs` check the pixels. Skips under `on_bad="skip"`
    are counted in `skips`."""
    _check_on_bad(on_bad)
    coco = coco_split(root, split)
    if coco is not None:
        return coco_pairs(*coco, on_bad, skips)
    image_dir, mask_dir = _split_dirs(root, split)
    images = _by_stem(image_dir, IMAGE_SUFFIXES, on_bad, skips)
    masks = _by_stem(mask_dir, MASK_SUFFIXES, on_bad, skips)
    for stem in sorted(masks.keys() - images.keys()):
        _handle(MissingImageError(masks[stem], f"no image {stem}.* in {image_dir}"), on_bad, skips)
    pairs = []
    for stem in sorted(images):
        if stem in masks:
            pairs.append(MaskPair(stem, images[stem], masks[stem]))
        else:
            err = MissingMaskError(images[stem], f"no mask {stem}.* in {mask_dir}")
            _handle(err, on_bad, skips)
    return pairs


def _coco_mask(pair: MaskPair) -> np.ndarray:
    """[H, W] bool mask of a COCO instance (polygons merged, RLE decoded, by pycocotools)."""
    seg, h, w = pair.coco["segmentation"], pair.coco["height"], pair.coco["width"]
    try:
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        return mask_utils.decode(rle).astype(bool)
    except Exception as err:  # pycocotools raises several types for malformed segmentations
        raise UnreadableFileError(
            pair.mask, f"{pair.name}: cannot rasterise its segmentation ({err})"
        ) from err


def _read_mask_gray(path: Path) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            return np.asarray(img.convert("L"))
    except Exception as err:  # PIL raises several unrelated types for broken files
        raise UnreadableFileError(path, f"cannot decode mask: {err}") from err


def _binarize(gray: np.ndarray, path: Path) -> np.ndarray:
    """[H, W] bool foreground of an 8-bit mask, or NonBinaryMaskError (rules in the module doc)."""
    if gray.max() <= 1:
        return gray == 1
    if path.suffix.lower() in JPEG_SUFFIXES:
        gray_px = (gray >= JPEG_GRAY[0]) & (gray <= JPEG_GRAY[1])
    else:
        gray_px = (gray != 0) & (gray != 255)
    fraction = float(gray_px.mean())
    if fraction > GRAY_FRACTION:
        raise NonBinaryMaskError(
            path,
            f"{100 * fraction:.1f} % of the pixels are neither 0 nor 255 (at most "
            f"{100 * GRAY_FRACTION:g} % allowed): a soft or label map, not a binary mask",
        )
    return gray > FOREGROUND_ABOVE


def load_pair(pair: MaskPair, *, allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(image [H, W, 3] uint8 RGB, mask [H, W] bool) of one pair, or a named MaskDataError:
    UnreadableFileError, MaskSizeError, NonBinaryMaskError, EmptyMaskError (unless
    `allow_empty`, for shadow sets whose images may hold no shadow)."""
    try:
        image = decode_image(pair.image.read_bytes(), str(pair.image))
    except (OSError, ValueError) as err:
        raise UnreadableFileError(pair.image, f"cannot read image: {err}") from err
    if pair.coco is not None:
        mask = _coco_mask(pair)
        if mask.shape != image.shape[:2]:
            raise MaskSizeError(
                pair.image,
                f"is {image.shape[1]}x{image.shape[0]} but {pair.mask.name} says {mask.shape[1]}x{mask.shape[0]} (W x H)",
            )
        if not allow_empty and not mask.any():
            raise EmptyMaskError(pair.mask, f"{pair.name}: the instance mask has no pixel")
        return image, mask
    gray = _read_mask_gray(pair.mask)
    if gray.shape != image.shape[:2]:
        raise MaskSizeError(
            pair.mask,
            f"mask is {gray.shape[1]}x{gray.shape[0]} but its image {pair.image.name} is "
            f"{image.shape[1]}x{image.shape[0]} (W x H); masks must have their image's size",
        )
    mask = _binarize(gray, pair.mask)
    if not allow_empty and not mask.any():
        raise EmptyMaskError(pair.mask, "mask has no foreground pixel")
    return image, mask


def iter_pairs(
    pairs: list[MaskPair],
    *,
    on_bad: str = "stop",
    skips: Skips | None = None,
    allow_empty: bool = False,
) -> Iterator[tuple[MaskPair, np.ndarray, np.ndarray]]:
    """(pair, image, mask) for every pair that loads; bad ones raise or are counted in `skips`."""
    _check_on_bad(on_bad)
    for pair in pairs:
        try:
            image, mask = load_pair(pair, allow_empty=allow_empty)
        except MaskDataError as err:
            _handle(err, on_bad, skips)
            continue
        yield pair, image, mask


def mask_box(mask: np.ndarray) -> list[float]:
    """GT box prompt [x0, y0, x1, y1] of an [H, W] bool mask, in the eval code's convention:
    `eval.prompts.box_xyxy` of the COCO bbox pycocotools gives for the mask, so x1 = last
    foreground column + 1 and y1 = last foreground row + 1 (pixel edges, not centres)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask_box expects an [H, W] mask, got shape {mask.shape}")
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError("mask_box: the mask is empty, it has no box")
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def full_image_box(hw: tuple[int, int]) -> list[float]:
    """Box prompt [0, 0, W, H] covering an image of size (H, W): the prompt-free setting."""
    h, w = hw
    return [0.0, 0.0, float(w), float(h)]


def prompt_box(mask: np.ndarray, prompt: str) -> list[float]:
    """The box prompt of a sample, in its image's pixels: `gt_box` (the mask's) or `full_box`."""
    if prompt == "gt_box":
        return mask_box(mask)
    if prompt == "full_box":
        return full_image_box(mask.shape)
    raise ValueError(f"prompt {prompt!r}: choose full_box or gt_box")
