"""COCO and LVIS readers: which images to evaluate, where their files are, and their ground truth.

Images are decoded by `teachers.preprocess.load_image`: PIL, converted to RGB (grayscale and
palette expanded, alpha dropped), the EXIF orientation tag ignored. Pixels are used as stored,
which is the grid COCO and LVIS annotations refer to and what EfficientViT-SAM's
`Image.open(path).convert("RGB")` gives. A decoded size that differs from the annotation file's
`height`/`width` is an error, since no mask could be compared then.

Ground-truth masks come from the official APIs (`pycocotools` `COCO.annToRLE`, `lvis`
`LVIS.ann_to_rle`): polygons are rasterised and merged, uncompressed (crowd) RLE is compressed.
Annotations those APIs cannot use (a polygon of fewer than 3 points, an empty segmentation, a box
with a negative or non-finite side, a non-finite area) are left out before the APIs see them,
each named in a warning and counted in the output (`skipped_annotations`), never computed.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils

from eval.metrics import coco_api, lvis_api
from eval.prompts import Protocol


@dataclass(frozen=True)
class EvalImage:
    """One image to evaluate and the prompts' sources on it.

    anns: the annotations the protocol keeps, in annotation-id order (GT box/point mode).
    dets: (index in the detections file, detection) pairs, in file order (detector-box mode).
    """

    image_id: int
    path: Path
    hw: tuple[int, int]
    anns: tuple[dict, ...] = ()
    dets: tuple[tuple[int, dict], ...] = ()


@dataclass
class EvalDataset:
    """A parsed COCO- or LVIS-format annotation file and the folder layout of its images."""

    kind: str
    """'coco' or 'lvis'."""
    ann_json: Path
    """The annotation file read."""
    gt: dict
    """Its parsed content."""
    paths: dict[int, Path]
    """Image id -> image file."""
    api: object = field(repr=False, default=None)
    """pycocotools COCO or lvis LVIS index over `gt`."""
    skipped: dict[int, str] = field(default_factory=dict)
    """Annotation id -> why it was left out of `gt` (`drop_bad_annotations`)."""

    def gt_rle(self, ann: dict) -> dict:
        """Compressed RLE of one annotation at its image's original size."""
        if self.kind == "coco":
            return self.api.annToRLE(ann)
        return self.api.ann_to_rle(ann)

    def image_anns(self, image_id: int) -> list[dict]:
        """Every annotation of one image, as the index holds them."""
        if self.kind == "coco":
            return self.api.imgToAnns.get(image_id, [])
        return self.api.img_ann_map.get(image_id, [])

    def gt_masks(self, anns: tuple[dict, ...]) -> tuple[list[dict], np.ndarray]:
        """RLEs and [N, H, W] bool masks of `anns` (all on one image)."""
        rles = [self.gt_rle(a) for a in anns]
        return rles, mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)


def _parse(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    data = _parse(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a COCO/LVIS annotation file (not a JSON object)")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path}: not a COCO/LVIS annotation file (no '{key}' key)")
    return data


def _finite(values: object) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, int | float) and math.isfinite(v) for v in values
    )


def annotation_problem(ann: dict) -> str | None:
    """Why the APIs cannot use `ann` (pycocotools would crash on it, or a prompt would be
    nonsense), or None."""
    box = ann.get("bbox")
    if not (_finite(box) and len(box) == 4):
        return f"bbox {box!r} is not 4 finite numbers"
    if box[2] < 0 or box[3] < 0:
        return f"bbox {box!r} has a negative width or height"
    area = ann.get("area")
    if not (isinstance(area, int | float) and math.isfinite(area)):
        return f"area {area!r} is not a finite number"
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        if not seg:
            return "segmentation is an empty list"
        for poly in seg:
            if not _finite(poly) or len(poly) < 6 or len(poly) % 2:
                points = len(poly) // 2 if isinstance(poly, list) else 0
                return f"a polygon with {points} point(s) (3 or more finite x, y pairs needed)"
    elif not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
        return f"segmentation is neither polygons nor RLE ({type(seg).__name__})"
    return None


def drop_bad_annotations(gt: dict, path: Path) -> dict[int, str]:
    """Remove from `gt` the annotations `annotation_problem` refuses, warn once naming them;
    {annotation id: reason}."""
    kept, skipped = [], {}
    for ann in gt["annotations"]:
        problem = annotation_problem(ann)
        if problem is None:
            kept.append(ann)
        else:
            skipped[ann.get("id")] = problem
    if skipped:
        gt["annotations"] = kept
        named = "; ".join(f"annotation {i}: {why}" for i, why in list(skipped.items())[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        print(
            f"warning: {path}: skipped {len(skipped)} annotation(s) with unusable geometry "
            f"({named}{more}); the output counts them (skipped_annotations)",
            file=sys.stderr,
        )
    return skipped


def load_coco(coco_root: str | Path, split: str = "val2017", ann_json: str | Path | None = None):
    """COCO layout: `coco_root/annotations/instances_<split>.json` (or `ann_json`) and images in
    `coco_root/<split>/<file_name>`."""
    root = Path(coco_root)
    path = Path(ann_json) if ann_json else root / "annotations" / f"instances_{split}.json"
    gt = _read_json(path, "COCO annotation file")
    skipped = drop_bad_annotations(gt, path)
    paths = {img["id"]: root / split / img["file_name"] for img in gt["images"]}
    return EvalDataset("coco", path, gt, paths, coco_api(gt), skipped)


def load_lvis(
    lvis_root: str | Path | None, coco_root: str | Path, lvis_json: str | Path | None = None
):
    """LVIS v1 layout: `lvis_root/lvis_v1_val.json` (or `lvis_json`); each image lives in
    `coco_root` under the last two parts of its `coco_url` (`train2017/...` or `val2017/...`),
    since LVIS v1 val draws its images from both COCO splits."""
    if lvis_json is None and lvis_root is None:
        raise ValueError("LVIS needs --lvis-root (holding lvis_v1_val.json) or --lvis-json")
    path = Path(lvis_json) if lvis_json else Path(lvis_root) / "lvis_v1_val.json"
    gt = _read_json(path, "LVIS annotation file")
    skipped = drop_bad_annotations(gt, path)
    paths = {}
    for img in gt["images"]:
        if "coco_url" not in img:
            raise ValueError(f"{path}: image {img['id']} has no coco_url to find its file by")
        paths[img["id"]] = Path(coco_root).joinpath(*img["coco_url"].split("/")[-2:])
    return EvalDataset("lvis", path, gt, paths, lvis_api(gt), skipped)


def _image(ds: EvalDataset, img: dict, **prompts) -> EvalImage:
    return EvalImage(img["id"], ds.paths[img["id"]], (img["height"], img["width"]), **prompts)


def gt_images(ds: EvalDataset, protocol: Protocol) -> list[EvalImage]:
    """Images with at least one annotation the protocol keeps, by image id; each with its kept
    annotations by annotation id. Raises ValueError when there is none."""
    by_image: dict[int, list[dict]] = {}
    for ann in ds.gt["annotations"]:
        if protocol.keeps(ann):
            by_image.setdefault(ann["image_id"], []).append(ann)
    images = [
        _image(ds, img, anns=tuple(sorted(by_image[img["id"]], key=lambda a: a["id"])))
        for img in sorted(ds.gt["images"], key=lambda i: i["id"])
        if img["id"] in by_image
    ]
    if not images:
        raise ValueError(
            f"{ds.ann_json}: nothing to evaluate: {len(ds.gt['images'])} images, "
            f"{len(ds.gt['annotations'])} annotations, none with area >= {protocol.min_area}"
            + ("" if protocol.include_crowd else " that is not a crowd")
        )
    return images


def read_detections(path: str | Path, ds: EvalDataset) -> list[dict]:
    """A COCO results json (a list of {image_id, category_id, bbox [x, y, w, h], score}),
    checked against the dataset's image and category ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detections file not found: {path}")
    dets = _parse(path)
    if not isinstance(dets, list):
        raise ValueError(f"{path}: expected a list of detections (COCO results format)")
    images = {img["id"] for img in ds.gt["images"]}
    cats = {c["id"] for c in ds.gt["categories"]}
    for i, det in enumerate(dets):
        missing = {"image_id", "category_id", "bbox", "score"} - set(det)
        if missing:
            raise ValueError(f"{path}: detection {i} lacks {', '.join(sorted(missing))}")
        if det["image_id"] not in images:
            raise ValueError(
                f"{path}: detection {i} is on image {det['image_id']}, not in {ds.ann_json}"
            )
        if det["category_id"] not in cats:
            raise ValueError(f"{path}: detection {i} has unknown category {det['category_id']}")
    return dets


def det_images(ds: EvalDataset, dets: list[dict]) -> list[EvalImage]:
    """Images with at least one detection, by image id; every detection kept (no threshold)."""
    by_image: dict[int, list[tuple[int, dict]]] = {}
    for i, det in enumerate(dets):
        by_image.setdefault(det["image_id"], []).append((i, det))
    images = [
        _image(ds, img, dets=tuple(by_image[img["id"]]))
        for img in sorted(ds.gt["images"], key=lambda i: i["id"])
        if img["id"] in by_image
    ]
    if not images:
        raise ValueError("nothing to evaluate: the detections file is empty")
    return images


def split_missing(images: list[EvalImage], skip_missing: bool) -> tuple[list[EvalImage], list[str]]:
    """(images whose file exists, missing file paths). Without `skip_missing` a missing file is
    a FileNotFoundError naming it (and how many others are missing)."""
    missing = [im for im in images if not im.path.is_file()]
    if missing and not skip_missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(
            f"image file not found: {missing[0].path}{more}; check --coco-root, or pass "
            "--skip-missing to evaluate without them (they are counted in the output)"
        )
    gone = {im.image_id for im in missing}
    return [im for im in images if im.image_id not in gone], [str(im.path) for im in missing]
