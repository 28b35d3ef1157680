"""Synthetic COCO- and LVIS-format datasets with exact instance masks, for tests and the CPU demo.

Every image is a textured background with overlapping shapes (rectangles, ellipses, polygons and
triangles, all given as polygons), a crowd of dots on some images, tiny specks and, on some
images, a zero-area line. Masks are defined by what `pycocotools` decodes from each annotation's
`segmentation`, and each instance's pixels are painted through exactly its visible mask, so
`COCO.annToMask` is the ground truth to the pixel. Later shapes occlude earlier ones.

Image index `i` fixes the special cases, the seed fixes the content (so any `num_images >= 8`
holds all of them): landscape when `i` is even, portrait when odd; `i % 4 == 1` grayscale
('L' PNG), `i % 4 == 2` RGBA PNG (alpha 255), else RGB JPEG at quality 95; `i % 8 == 3` carries
EXIF Orientation=6 with its pixels stored un-rotated: annotations, `height` and `width` refer to
the stored pixel grid, so readers must not apply the tag (`cv2.imread` does by default);
`i % 3 == 0` has a crowd (`iscrowd=1`, uncompressed RLE); `i % 4 == 1` has a zero-area line whose
bbox has width 0. Fully visible instances get polygons, occluded ones a compressed RLE of their
visible region. Category ids have gaps, as in COCO.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

# (id, name, supercategory, LVIS frequency); LVIS would count training images, we just pick.
CATEGORIES = (
    (1, "rectangle", "shape", "f"),
    (2, "ellipse", "shape", "f"),
    (3, "polygon", "shape", "c"),
    (5, "triangle", "shape", "c"),
    (7, "dot", "mark", "r"),
    (9, "line", "mark", "r"),
)
RECTANGLE, ELLIPSE, POLYGON, TRIANGLE, DOT, LINE = (c[0] for c in CATEGORIES)
# Largest |texture| added to a flat colour; palette steps exceed 4x this so that every region
# stays distinguishable from its neighbours, which the tests check on lossless images.
TEXTURE = 3
EXIF_ORIENTATION = 0x0112
COCO_URL = "http://images.cocodataset.org"


@dataclass(eq=False)
class Instance:
    """One object. `full` and `visible` are [H, W] bool; `polygon` is flat [x0, y0, x1, y1, ...]
    in pixel coordinates, None for crowds."""

    category_id: int
    full: np.ndarray
    polygon: list[float] | None = None
    iscrowd: bool = False
    visible: np.ndarray | None = None


def polygon_mask(polygon: list[float], h: int, w: int) -> np.ndarray:
    """[H, W] bool mask of one flat polygon, rasterised by pycocotools as `COCO.annToMask` does."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))).astype(bool)


def _polygon(xs: np.ndarray, ys: np.ndarray, h: int, w: int) -> list[float]:
    # Two decimals like COCO; the mask is rasterised from these rounded values.
    xs, ys = np.clip(xs, 0, w), np.clip(ys, 0, h)
    return [round(float(v), 2) for v in np.stack([xs, ys], 1).ravel()]


def _shape(rng: np.random.Generator, h: int, w: int, cx: float, cy: float) -> Instance:
    """A rectangle, ellipse, star-convex polygon or triangle around (cx, cy), which it covers,
    sized relative to the image."""
    r = rng.uniform(0.15, 0.35) * min(h, w)
    category_id = int(rng.choice([RECTANGLE, ELLIPSE, POLYGON, TRIANGLE]))
    if category_id == RECTANGLE:
        rw, rh = r * rng.uniform(0.5, 1.0, 2)
        px, py = np.array([-rw, rw, rw, -rw]), np.array([-rh, -rh, rh, rh])
    elif category_id == ELLIPSE:
        t, rot = np.linspace(0, 2 * np.pi, 24, endpoint=False), rng.uniform(0, np.pi)
        a, b = r * rng.uniform(0.5, 1.0), r * rng.uniform(0.3, 1.0)
        px = a * np.cos(t) * np.cos(rot) - b * np.sin(t) * np.sin(rot)
        py = a * np.cos(t) * np.sin(rot) + b * np.sin(t) * np.cos(rot)
    else:
        # Jitter of +-0.2 step keeps vertices in order (no self-crossing) and every angular gap
        # below pi, so the polygon covers its centre.
        n = 3 if category_id == TRIANGLE else int(rng.integers(5, 9))
        t = rng.uniform(0, 2 * np.pi) + (np.arange(n) + rng.uniform(-0.2, 0.2, n)) * 2 * np.pi / n
        radius = r * rng.uniform(0.5, 1.0, n)
        px, py = radius * np.cos(t), radius * np.sin(t)
    polygon = _polygon(cx + px, cy + py, h, w)
    return Instance(category_id, polygon_mask(polygon, h, w), polygon)


def _tiny(rng: np.random.Generator, h: int, w: int) -> Instance:
    """An axis-aligned speck of 1 to 6 pixels (integer corners rasterise to exactly a x b)."""
    a, b = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    x, y = int(rng.integers(0, w - a)), int(rng.integers(0, h - b))
    polygon = [float(v) for v in (x, y, x + a, y, x + a, y + b, x, y + b)]
    return Instance(DOT, polygon_mask(polygon, h, w), polygon)


def _zero_area(rng: np.random.Generator, h: int, w: int) -> Instance:
    """A vertical line as a three-point polygon: pycocotools rasterises it to no pixels."""
    x, y = int(rng.integers(1, w - 1)), int(rng.integers(0, h // 2))
    length = int(rng.integers(3, h // 2))
    polygon = [float(v) for v in (x, y, x, y + length, x, y + length // 2)]
    return Instance(LINE, polygon_mask(polygon, h, w), polygon)


def _crowd(rng: np.random.Generator, h: int, w: int) -> Instance:
    """A cluster of small dots annotated as one crowd region (their union)."""
    cx, cy, spread = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, 0.2 * min(h, w)
    full = np.zeros((h, w), bool)
    t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    for _ in range(int(rng.integers(6, 12))):
        x, y, r = cx + rng.normal(0, spread), cy + rng.normal(0, spread), rng.uniform(1.5, 3.5)
        full |= polygon_mask(_polygon(x + r * np.cos(t), y + r * np.sin(t), h, w), h, w)
    return Instance(DOT, full, iscrowd=True)


def _texture(rng: np.random.Generator, h: int, w: int, channels: int) -> np.ndarray:
    """[H, W, C] int16 in [-TEXTURE, TEXTURE]: oriented stripes of amplitude 2 plus +-1 noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    theta, period, phase = rng.uniform(0, np.pi), rng.uniform(4, 12), rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
    noise = rng.integers(-1, 2, (h, w, channels))
    return (np.round(2 * wave)[..., None] + noise).astype(np.int16)


def _palette(rng: np.random.Generator, n: int, channels: int) -> np.ndarray:
    """[n, C] distinct colours on a grid (step 32 in colour, 16 in gray), so any two differ by
    more than 4 * TEXTURE in some channel."""
    if channels == 1:
        return rng.choice(np.arange(8, 256, 16), n, replace=False)[:, None]
    levels = np.arange(16, 256, 32)
    picks = rng.choice(levels.size**3, n, replace=False)
    return levels[np.stack([picks // 64, picks // 8 % 8, picks % 8], 1)]


def _paint(
    rng: np.random.Generator, instances: list[Instance], h: int, w: int, channels: int
) -> np.ndarray:
    """Paint background then each instance through its visible mask: [H, W, C] uint8."""
    colours = _palette(rng, len(instances) + 1, channels)
    pixels = colours[0] + _texture(rng, h, w, channels)
    for inst, colour in zip(instances, colours[1:], strict=True):
        pixels[inst.visible] = colour + _texture(rng, h, w, channels)[inst.visible]
    return pixels.astype(np.uint8)


def _occlude(instances: list[Instance]) -> list[Instance]:
    """Set visible masks (later instances on top); drop those left with no pixel, except the
    deliberate zero-area line."""
    covered = np.zeros_like(instances[0].full)
    for inst in reversed(instances):
        inst.visible = inst.full & ~covered
        covered |= inst.full
    return [i for i in instances if i.visible.any() or i.category_id == LINE]


def scene(
    seed: int, index: int, min_side: int, max_side: int, channels: int
) -> tuple[np.ndarray, list[Instance]]:
    """Image `index` of the dataset for `seed`: pixels [H, W, C] uint8 and its instances in
    drawing order. Each image has its own random stream, so adding images changes no other."""
    rng = np.random.default_rng([seed, index])
    # Aspect ratio at least 1.2 where the size range allows, so no image is nearly square.
    long = int(rng.integers(min(max_side, int(np.ceil(1.2 * min_side))), max_side + 1))
    short = int(rng.integers(min_side, max(min_side, int(long / 1.2)) + 1))
    h, w = (short, long) if index % 2 == 0 else (long, short)
    instances = []
    for k in range(int(rng.integers(3, 6))):
        cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
        ys, xs = np.nonzero(instances[int(rng.integers(k))].full) if k else ((), ())
        if len(xs) and (k == 1 or rng.random() < 0.5):  # centred on an earlier shape: overlap
            j = int(rng.integers(len(xs)))
            cx, cy = xs[j] + 0.5, ys[j] + 0.5
        instances.append(_shape(rng, h, w, cx, cy))
    if index % 3 == 0:
        instances.append(_crowd(rng, h, w))
    instances += [_tiny(rng, h, w) for _ in range(1 + index % 2)]
    if index % 4 == 1:
        instances.append(_zero_area(rng, h, w))
    instances = _occlude(instances)
    return _paint(rng, instances, h, w, channels), instances


def _save(pixels: np.ndarray, path: Path, mode: str, exif_orientation: int | None = None) -> None:
    """Write [H, W, C] uint8 pixels as mode 'RGB'/'L' (JPEG or PNG by suffix) or 'RGBA' PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGBA":
        pixels = np.concatenate([pixels, np.full_like(pixels[..., :1], 255)], -1)
    img = Image.fromarray(pixels[..., 0] if mode == "L" else pixels)
    if path.suffix == ".png":
        img.save(path, "PNG")
        return
    exif = Image.Exif()
    if exif_orientation is not None:
        exif[EXIF_ORIENTATION] = exif_orientation
    img.save(path, "JPEG", quality=95, **({"exif": exif.tobytes()} if exif else {}))


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format for an [H, W] bool mask: column-major run lengths, zeros first."""
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], edges])).tolist()}


def _annotation(inst: Instance, ann_id: int, image_id: int) -> dict:
    """COCO annotation dict; area and bbox from pycocotools on the visible mask."""
    rle = mask_utils.encode(np.asfortranarray(inst.visible, dtype=np.uint8))
    area, bbox = float(mask_utils.area(rle)), mask_utils.toBbox(rle).tolist()
    if inst.iscrowd:
        segmentation = uncompressed_rle(inst.visible)
    elif np.array_equal(inst.visible, inst.full):
        segmentation = [inst.polygon]
        if area == 0:  # toBbox gives [0, 0, 0, 0]; keep where the degenerate polygon lies
            xs, ys = inst.polygon[0::2], inst.polygon[1::2]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    else:
        segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return dict(
        id=ann_id,
        image_id=image_id,
        category_id=inst.category_id,
        segmentation=segmentation,
        area=area,
        bbox=bbox,
        iscrowd=int(inst.iscrowd),
    )


def _check_sizes(num_images: int, min_side: int, max_side: int) -> None:
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 16 <= min_side < max_side:
        raise ValueError(f"need 16 <= min_side < max_side, got {min_side} and {max_side}")


def write_coco_json(path: Path, images: list, annotations: list, categories: list) -> Path:
    """A COCO-format annotation file at `path` (its folder made); returns `path`."""
    dataset = {"info": {"description": "sam-distill synthetic dataset"}, "licenses": []}
    dataset.update(images=images, annotations=annotations, categories=categories)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataset))
    return path


def make_coco(
    root: str | Path,
    *,
    split: str = "val2017",
    num_images: int = 8,
    seed: int = 0,
    min_side: int = 48,
    max_side: int = 160,
) -> Path:
    """Write root/<split>/<file_name> images and root/annotations/instances_<split>.json; return
    the json path. Image ids run from 1; file names are COCO's `{id:012d}` with .jpg or .png."""
    _check_sizes(num_images, min_side, max_side)
    images, annotations = [], []
    for i in range(num_images):
        mode = ("RGB", "L", "RGBA", "RGB")[i % 4]
        pixels, instances = scene(seed, i, min_side, max_side, 1 if mode == "L" else 3)
        image_id, (h, w) = i + 1, pixels.shape[:2]
        file_name = f"{image_id:012d}" + (".jpg" if mode == "RGB" else ".png")
        _save(pixels, Path(root) / split / file_name, mode, 6 if i % 8 == 3 else None)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for inst in instances:
            annotations.append(_annotation(inst, len(annotations) + 1, image_id))
    categories = [{"id": c, "name": n, "supercategory": s} for c, n, s, _ in CATEGORIES]
    path = Path(root) / "annotations" / f"instances_{split}.json"
    return write_coco_json(path, images, annotations, categories)


def _lvis_image(
    image_id: int, split: str, hw: tuple[int, int], instances: list, kept: list
) -> dict:
    """Image entry: unannotated instances make their category not exhaustive in this image."""
    present = {x.category_id for x in instances}
    missed = {x.category_id for x in instances if x not in kept and x.full.any()}
    return dict(
        id=image_id,
        height=hw[0],
        width=hw[1],
        coco_url=f"{COCO_URL}/{split}/{image_id:012d}.jpg",
        neg_category_ids=sorted({c[0] for c in CATEGORIES} - present),
        not_exhaustive_category_ids=sorted(missed),
    )


def _lvis_category(cat_id: int, name: str, frequency: str, annotations: list[dict]) -> dict:
    anns = [a for a in annotations if a["category_id"] == cat_id]
    return {
        "id": cat_id,
        "name": name,
        "synset": f"{name}.n.01",
        "synonyms": [name],
        "def": f"a synthetic {name}",
        "frequency": frequency,
        "image_count": len({a["image_id"] for a in anns}),
        "instance_count": len(anns),
    }


def make_lvis(
    lvis_root: str | Path,
    coco_root: str | Path,
    *,
    num_images: int = 8,
    seed: int = 0,
    min_side: int = 48,
    max_side: int = 160,
    first_image_id: int = 100_000,
) -> Path:
    """Write LVIS v1-format lvis_root/lvis_v1_val.json whose images live in coco_root/val2017 (even
    index) and coco_root/train2017 (odd), named by the last two parts of `coco_url`; return the
    json path. Ids start at `first_image_id` so that `make_coco` files in the same root survive.

    As in LVIS: polygons only, no crowds, no zero-area annotations. Occluded shapes and crowds
    stay unannotated and their categories go to the image's `not_exhaustive_category_ids`;
    `neg_category_ids` lists the categories absent from the image. All images are JPEGs (RGB, or
    'L' when `i % 4 == 1`, as COCO has a few grayscale JPEGs).
    """
    _check_sizes(num_images, min_side, max_side)
    images, annotations = [], []
    for i in range(num_images):
        mode, split = ("L" if i % 4 == 1 else "RGB"), ("val2017", "train2017")[i % 2]
        # Another stream than make_coco's, so the two never show the same picture under two ids.
        pixels, instances = scene(seed + 1_000_003, i, min_side, max_side, 1 if mode == "L" else 3)
        image_id = first_image_id + i
        _save(pixels, Path(coco_root) / split / f"{image_id:012d}.jpg", mode)
        kept = [x for x in instances if not x.iscrowd and x.full.any()]
        kept = [x for x in kept if np.array_equal(x.visible, x.full)]
        for inst in kept:
            annotations.append(_annotation(inst, len(annotations) + 1, image_id))
            del annotations[-1]["iscrowd"]
        images.append(_lvis_image(image_id, split, pixels.shape[:2], instances, kept))
    categories = [_lvis_category(c, n, f, annotations) for c, n, _, f in CATEGORIES]
    return write_coco_json(Path(lvis_root) / "lvis_v1_val.json", images, annotations, categories)


def instance_masks(ann_json: str | Path) -> dict[int, np.ndarray]:
    """Annotation id -> [H, W] bool mask, decoded by pycocotools from a COCO or LVIS json."""
    dataset = json.loads(Path(ann_json).read_text())
    sizes = {img["id"]: (img["height"], img["width"]) for img in dataset["images"]}
    masks = {}
    for ann in dataset["annotations"]:
        segm, (h, w) = ann["segmentation"], sizes[ann["image_id"]]
        if isinstance(segm, list):  # polygons, merged into one mask as COCO.annToRLE does
            segm = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        elif isinstance(segm["counts"], list):  # uncompressed crowd RLE
            segm = mask_utils.frPyObjects(segm, h, w)
        masks[ann["id"]] = mask_utils.decode(segm).astype(bool)
    return masks
