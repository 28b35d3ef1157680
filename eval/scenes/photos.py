"""Seeded COCO-format scenes cut from the real photographs bundled in scikit-image's wheel.

A scene is a crop of one photograph (the background, randomly scaled and mirrored) with 2 to 8
objects pasted on it, each an outline from `eval.scenes.shapes` (ellipse, convex or star
polygon, smooth blob, or scikit-image's horse silhouette) filled with a crop of another
photograph of the same split. Objects cover 1 % to 40 % of the image before occlusion
(log-uniform), half of them are centred on an earlier one, all but the top one may hang over the
frame by a quarter of their box, and later objects occlude earlier ones. Edges are hard, so
`labels` (0 background, 1..K the visible part of each object) are exact. An object whose visible
part is under max(16 px, 0.3 % of the image) is removed before painting (the ones beneath show
through, which only grows them), so K is rarely 1 (about 1 % of scenes). `layout` draws
everything random and `render` paints it: tests and writers see each object's whole outline
(`Shape.full`) and the photographs a scene shows (`Layout.photos`).

Photographs: every image `skimage.data` returns from the wheel with no download, except
`cat` (the same file as `chelsea`), the drawn `logo` and `colorwheel`, 25x25 `lfw_subset`,
102x102 `microaneurysms` and the synthetic phantom, checkerboard and blobs. Gray ones are
repeated over three channels. The split is by photograph, with each kind on both sides:

    TRAIN_PHOTOS: people, animals, objects (astronaut, chelsea, coffee, camera, coins), science
                  (hubble_deep_field, immunohistochemistry, moon), texture (brick, grass), print
                  (page);
    HELD_PHOTOS:  objects (rocket, motorcycle, clock), science (retina, cell), texture (gravel),
                  print (text).

Held scenes use held photographs only, as backgrounds and as object textures, so a model trained
on the train split has never seen their pixels. The horse is a shape, not a texture: both splits
use it. Scene `index` of a split has its own random stream `(seed, split, index)`, so adding
scenes changes no other. Speed, on one core of a busy 2-core machine, photographs cached: about
7 ms per scene at the default 256..512 long side, 9 to 10 ms at 512 (most of it PIL resampling).

`make_photo_coco` writes a split as a COCO dataset (train -> train2017/, held -> val2017/, which
`eval/coco.py --coco-root ROOT` reads); `make_camouflage_domain` writes one-object scenes whose
object is cut from its own background photograph in the layout `teachers.mask_folders` reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import skimage
from PIL import Image
from skimage import data
from tqdm import tqdm

from eval.scenes.domain import write_domain
from eval.scenes.shapes import SHAPES
from eval.scenes.synthetic import write_coco_json

TRAIN_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "brick",
    "grass",
    "page",
)
HELD_PHOTOS = ("rocket", "motorcycle", "clock", "retina", "cell", "gravel", "text")
SPLITS = {"train": TRAIN_PHOTOS, "held": HELD_PHOTOS}
SILHOUETTES = ("horse",)
AREA_RANGE = (0.01, 0.4)  # object area before occlusion, as a fraction of the image
MIN_VISIBLE = (16, 0.003)  # keep an object with >= max(pixels, fraction of the image) visible
NUM_OBJECTS = (2, 8)
ZOOM_RANGE = (0.5, 2.0)  # photo pixels per scene pixel in an object's texture
SCENE_STREAM, CAMOUFLAGE_STREAM = 0, 1
COCO_FOLDERS = {"train": "train2017", "held": "val2017"}  # eval/coco.py reads val2017
CATEGORIES = [{"id": i, "name": kind, "supercategory": "shape"} for i, kind in enumerate(SHAPES, 1)]
# Camouflage domain: val image i is camouflage scene VAL_OFFSET + i, so adding train images
# changes no val image.
VAL_OFFSET = 1_000_000
VERSION = 1


def _load(name: str) -> np.ndarray:
    if name == "motorcycle":
        return data.stereo_motorcycle()[0]  # the left view
    return getattr(data, name)()


@lru_cache(maxsize=32)  # all 18 photographs
def photo(name: str) -> Image.Image:
    """The photograph `name` (one of TRAIN_PHOTOS or HELD_PHOTOS) as an RGB PIL image, loaded
    once per process from scikit-image's wheel."""
    if name not in TRAIN_PHOTOS + HELD_PHOTOS:
        raise ValueError(f"photo {name!r}: choose one of {', '.join(TRAIN_PHOTOS + HELD_PHOTOS)}")
    return Image.fromarray(_load(name)).convert("RGB")


@dataclass(frozen=True, eq=False)
class Shape:
    """One pasted object. `mask` [h, w] bool is its whole outline; the box's corner lands at
    (`top`, `left`) in the image, which may lie outside it (the frame clips the object). Its
    texture is `photo` resampled from the box `crop` (x0, y0, x1, y1 in photo pixels) to [h, w],
    then `transpose`d (None: as is)."""

    kind: str
    mask: np.ndarray
    top: int
    left: int
    photo: str
    crop: tuple[float, float, float, float]
    transpose: Image.Transpose | None

    def window(self, hw: tuple[int, int]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """(image slices, mask slices) of the part of the box inside an image of size `hw`."""
        (h, w), (y, x) = self.mask.shape, (self.top, self.left)
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, hw[0]), min(x + w, hw[1])
        return (slice(y0, y1), slice(x0, x1)), (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))

    def full(self, hw: tuple[int, int]) -> np.ndarray:
        """[H, W] bool: the whole outline within the frame, before occlusion."""
        out = np.zeros(hw, bool)
        image_win, mask_win = self.window(hw)
        out[image_win] = self.mask[mask_win]
        return out


@dataclass(frozen=True, eq=False)
class Layout:
    """Everything drawn at random for one scene; `render` makes its pixels. `shapes` are the
    kept objects in painting order: label k is `shapes[k - 1]`."""

    hw: tuple[int, int]
    background: str
    crop: tuple[float, float, float, float]
    transpose: Image.Transpose | None
    shapes: tuple[Shape, ...]
    num_dropped: int

    @property
    def photos(self) -> set[str]:
        """The photographs the rendered scene shows."""
        return {self.background} | {s.photo for s in self.shapes}


def _check(split: str, seed: int, index: int, min_side: int, max_side: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    if not 32 <= min_side <= max_side:
        raise ValueError(f"need 32 <= min_side <= max_side, got {min_side} and {max_side}")


def _rng(split: str, index: int, seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, list(SPLITS).index(split), index, stream])


def _size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """(H, W): long side in [min_side, max_side], W / H log-uniform in [1/2, 2]."""
    long = int(rng.integers(min_side, max_side + 1))
    aspect = float(np.exp(rng.uniform(-np.log(2), np.log(2))))
    short = round(long / max(aspect, 1 / aspect))
    return (short, long) if aspect >= 1 else (long, short)


def _crop(
    rng: np.random.Generator, name: str, hw: tuple[int, int], zoom: float
) -> tuple[float, float, float, float]:
    """A box of `zoom` photo pixels per output pixel with the aspect of `hw`, at a random place
    in photo `name`; the zoom shrinks where the box would not fit."""
    pw, ph = photo(name).size
    zoom = min(zoom, pw / hw[1], ph / hw[0])
    cw, ch = hw[1] * zoom, hw[0] * zoom
    x0, y0 = rng.uniform(0, max(pw - cw, 0.0)), rng.uniform(0, max(ph - ch, 0.0))
    return (x0, y0, x0 + cw, y0 + ch)


def _mirror(rng: np.random.Generator) -> Image.Transpose | None:
    return Image.Transpose.FLIP_LEFT_RIGHT if rng.random() < 0.5 else None


def _place(
    rng: np.random.Generator,
    box: tuple[int, int],
    hw: tuple[int, int],
    under: list[Shape],
    inside: bool,
) -> tuple[int, int]:
    """(top, left) of a box: centred on a random point of an earlier object half of the time
    (so objects overlap), anywhere otherwise; `inside` keeps it in the frame, else up to a
    quarter of it may hang over."""
    if under and rng.random() < 0.5:
        other = under[int(rng.integers(len(under)))]
        cy = other.top + other.mask.shape[0] * rng.uniform(0.1, 0.9)
        cx = other.left + other.mask.shape[1] * rng.uniform(0.1, 0.9)
    else:
        cy, cx = rng.uniform(0, hw[0]), rng.uniform(0, hw[1])
    over = (0, 0) if inside else (box[0] // 4, box[1] // 4)
    top = int(np.clip(round(cy - box[0] / 2), -over[0], hw[0] - box[0] + over[0]))
    left = int(np.clip(round(cx - box[1] / 2), -over[1], hw[1] - box[1] + over[1]))
    return top, left


def _outline(
    rng: np.random.Generator, hw: tuple[int, int], area_range: tuple[float, float]
) -> tuple[str, np.ndarray]:
    """(kind, [h, w] bool mask) of a random shape of log-uniform area in `area_range` (fractions
    of the image), its box at most 95 % of the image's sides."""
    kind = list(SHAPES)[int(rng.integers(len(SHAPES)))]
    fraction = np.exp(rng.uniform(np.log(area_range[0]), np.log(area_range[1])))
    return kind, SHAPES[kind](rng, fraction * hw[0] * hw[1], (0.95 * hw[0], 0.95 * hw[1]))


def _object(
    rng: np.random.Generator, hw: tuple[int, int], photos: list[str], under: list[Shape], top: bool
) -> Shape:
    """An object textured from one of `photos`, placed among the objects `under` it."""
    kind, mask = _outline(rng, hw, AREA_RANGE)
    y, x = _place(rng, mask.shape, hw, under, inside=top)
    name = photos[int(rng.integers(len(photos)))]
    zoom = float(np.exp(rng.uniform(np.log(ZOOM_RANGE[0]), np.log(ZOOM_RANGE[1]))))
    return Shape(kind, mask, y, x, name, _crop(rng, name, mask.shape, zoom), _mirror(rng))


def paint_labels(shapes: tuple[Shape, ...] | list[Shape], hw: tuple[int, int]) -> np.ndarray:
    """[H, W] int32: 0 background, k where `shapes[k - 1]` is on top (later ones occlude)."""
    labels = np.zeros(hw, np.int32)
    for k, shape in enumerate(shapes, 1):
        image_win, mask_win = shape.window(hw)
        labels[image_win][shape.mask[mask_win]] = k
    return labels


def _visible(shapes: list[Shape], hw: tuple[int, int]) -> tuple[Shape, ...]:
    """The shapes whose visible area reaches MIN_VISIBLE. Removing the others only uncovers
    pixels of the rest, so one pass suffices."""
    areas = np.bincount(paint_labels(shapes, hw).ravel(), minlength=len(shapes) + 1)[1:]
    threshold = max(MIN_VISIBLE[0], MIN_VISIBLE[1] * hw[0] * hw[1])
    return tuple(s for s, a in zip(shapes, areas, strict=True) if a >= threshold)


def _background(
    rng: np.random.Generator, photos: tuple[str, ...], hw: tuple[int, int]
) -> tuple[str, tuple[float, float, float, float], Image.Transpose | None]:
    """(name, crop, transpose): a crop of 35..100 % of the largest box of the image's aspect."""
    name = photos[int(rng.integers(len(photos)))]
    pw, ph = photo(name).size
    crop = _crop(rng, name, hw, min(pw / hw[1], ph / hw[0]) * rng.uniform(0.35, 1.0))
    return name, crop, _mirror(rng)


def layout(
    split: str, index: int, seed: int = 0, min_side: int = 256, max_side: int = 512
) -> Layout:
    """The random draws of scene `index` of `split` ("train" or "held"); see the module doc."""
    _check(split, seed, index, min_side, max_side)
    rng = _rng(split, index, seed, SCENE_STREAM)
    hw = _size(rng, min_side, max_side)
    name, crop, transpose = _background(rng, SPLITS[split], hw)
    others = [p for p in SPLITS[split] if p != name]
    num = int(rng.integers(NUM_OBJECTS[0], NUM_OBJECTS[1] + 1))
    shapes: list[Shape] = []
    for k in range(num):
        shapes.append(_object(rng, hw, others, shapes, top=k == num - 1))
    kept = _visible(shapes, hw)
    return Layout(hw, name, crop, transpose, kept, num - len(kept))


def _texture(
    name: str, crop: tuple[float, ...], hw: tuple[int, int], transpose: Image.Transpose | None
) -> np.ndarray:
    """[h, w, 3] uint8: box `crop` of photo `name` resampled bilinearly to `hw`."""
    img = photo(name).resize((hw[1], hw[0]), Image.Resampling.BILINEAR, box=crop)
    return np.asarray(img if transpose is None else img.transpose(transpose))


def render(scene_layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """(image [H, W, 3] uint8 RGB, labels [H, W] int32) of a layout: each object is painted
    through exactly the pixels its label marks."""
    hw = scene_layout.hw
    image = np.array(
        _texture(scene_layout.background, scene_layout.crop, hw, scene_layout.transpose)
    )
    labels = paint_labels(scene_layout.shapes, hw)
    for k, shape in enumerate(scene_layout.shapes, 1):
        image_win, mask_win = shape.window(hw)
        visible = labels[image_win] == k
        texture = _texture(shape.photo, shape.crop, shape.mask.shape, shape.transpose)
        np.copyto(image[image_win], texture[mask_win], where=visible[..., None])
    return image, labels


def scene(
    split: str, index: int, seed: int = 0, min_side: int = 256, max_side: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Scene `index` of `split`: (image [H, W, 3] uint8 RGB, labels [H, W] int32 with 0 for the
    background and 1..K for the visible part of each object). The long side is in [min_side,
    max_side] and W / H in [1/2, 2]. A pure function of its arguments."""
    return render(layout(split, index, seed, min_side, max_side))


def camouflage_layout(
    split: str, index: int, seed: int = 0, min_side: int = 256, max_side: int = 512
) -> Layout:
    """One object of 5..25 % of the image, inside the frame, its texture another crop of the
    background's own photograph at about the same zoom, turned by 180 degrees so that it does
    not line up with the pixels it covers: only the outline's seam gives it away."""
    _check(split, seed, index, min_side, max_side)
    rng = _rng(split, index, seed, CAMOUFLAGE_STREAM)
    hw = _size(rng, min_side, max_side)
    name, crop, transpose = _background(rng, SPLITS[split], hw)
    kind, mask = _outline(rng, hw, (0.05, 0.25))
    y, x = _place(rng, mask.shape, hw, [], inside=True)
    zoom = (crop[2] - crop[0]) / hw[1] * rng.uniform(0.8, 1.25)
    texture = _crop(rng, name, mask.shape, zoom)
    shape = Shape(kind, mask, y, x, name, texture, Image.Transpose.ROTATE_180)
    return Layout(hw, name, crop, transpose, (shape,), 0)


def camouflage_scene(
    split: str, index: int, seed: int = 0, min_side: int = 256, max_side: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """(image [H, W, 3] uint8 RGB, mask [H, W] bool) of `camouflage_layout`; a stream apart from
    `scene`'s, so camouflage scene i and scene i are unrelated."""
    image, labels = render(camouflage_layout(split, index, seed, min_side, max_side))
    return image, labels == 1


def _annotation(mask: np.ndarray, category_id: int, ann_id: int, image_id: int) -> dict:
    """COCO annotation of an [H, W] bool visible mask: compressed RLE, area and tight bbox
    [x, y, w, h] from pycocotools, as `eval.scenes.synthetic` writes an occluded instance."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return dict(
        id=ann_id,
        image_id=image_id,
        category_id=category_id,
        segmentation={"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        area=float(mask_utils.area(rle)),
        bbox=mask_utils.toBbox(rle).tolist(),
        iscrowd=0,
    )


def _provenance(generator: str, seed: int, **fields) -> dict:
    """How scenes were made, as their json record keeps it: this module's `generator` function,
    its version, scikit-image's (whose photographs the scenes cut), the seed, then `fields`."""
    return dict(
        generator=f"eval.scenes.photos.{generator}",
        version=VERSION,
        scikit_image=skimage.__version__,
        seed=seed,
        **fields,
    )


def _record(path: Path, key: str, params: dict) -> None:
    """Set `key` of the json object in `path` (made if missing) to `params`: train and held
    written into one root each keep their entry."""
    record = json.loads(path.read_text()) if path.is_file() else {}
    record[key] = params
    path.write_text(json.dumps(record, indent=1))


def make_photo_coco(
    root: str | Path,
    split: str = "train",
    num_images: int = 64,
    seed: int = 0,
    *,
    min_side: int = 256,
    max_side: int = 512,
    folder: str | None = None,
    progress: bool = False,
) -> Path:
    """Write scenes 0..num_images-1 of `split` as root/<folder>/<id:012d>.jpg (JPEG quality 95,
    ids from 1) and root/annotations/instances_<folder>.json, one category per shape kind;
    return the json path. `folder` defaults to train2017 for "train" and val2017 for "held".
    root/scenes.json records, under the folder's name, how the scenes were made. Masks come from
    the labels, not the lossy JPEG: they are exact."""
    _check(split, seed, 0, min_side, max_side)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    root, folder = Path(root), folder or COCO_FOLDERS[split]
    (root / folder).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in tqdm(range(num_images), desc=f"scenes {folder}", disable=not progress):
        scene_layout = layout(split, i, seed, min_side, max_side)
        image, labels = render(scene_layout)
        image_id, (h, w) = i + 1, scene_layout.hw
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(image).save(root / folder / file_name, "JPEG", quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for k, shape in enumerate(scene_layout.shapes, 1):
            category_id = list(SHAPES).index(shape.kind) + 1
            annotations.append(
                _annotation(labels == k, category_id, len(annotations) + 1, image_id)
            )
    params = _provenance(
        "scene",
        seed,
        split=split,
        num_images=num_images,
        min_side=min_side,
        max_side=max_side,
        photos=list(SPLITS[split]),
        silhouettes=list(SILHOUETTES),
    )
    _record(root / "scenes.json", folder, params)
    path = root / "annotations" / f"instances_{folder}.json"
    return write_coco_json(path, images, annotations, CATEGORIES)


def make_camouflage_domain(
    root: str | Path,
    num_train: int = 16,
    num_val: int = 8,
    seed: int = 0,
    *,
    size: int = 256,
    image_suffix: str = ".jpg",
) -> Path:
    """Write camouflage scenes of the held photographs (never seen by a model trained on the
    train split: a shifted domain) under `root` in `eval.scenes.domain`'s layout, which
    `teachers.mask_folders` reads, and return `root`::

        ROOT/{train,val}/images/{split}_{i:05d}.jpg   ROOT/{train,val}/masks/{split}_{i:05d}.png
        ROOT/domain.json                              (the generator's parameters)

    size: every image's long side (at least 32); the aspect varies from 1:2 to 2:1.
    image_suffix: ".jpg" (quality 95, as COD10K ships) or ".png" (lossless). Masks are 0/255 PNGs.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    _check("held", seed, 0, size, size)

    def sample(split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        offset = VAL_OFFSET if split == "val" else 0
        return camouflage_scene("held", offset + i, seed, size, size)

    params = _provenance(
        "camouflage_scene",
        seed,
        size=size,
        num_train=num_train,
        num_val=num_val,
        val_index_offset=VAL_OFFSET,
        image_suffix=image_suffix,
        photos=list(HELD_PHOTOS),
    )
    return write_domain(root, num_train, num_val, size, image_suffix, sample, params)
