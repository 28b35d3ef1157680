"""A synthetic camouflage domain with exact binary masks, for adaptation tests and the CPU demo.

Written in the COD10K/CAMO layout that `teachers.mask_folders` reads::

    ROOT/{train,val}/images/{split}_{i:05d}.png     ROOT/{train,val}/masks/{split}_{i:05d}.png
    ROOT/domain.json                                 (the generator's parameters)

Each image holds one blob of random smooth shape (a star-shaped contour whose radius is a short
random Fourier series). Inside and outside carry band-pass Gaussian noise of the same colour and
the same contrast: each texture is shifted and scaled to mean 0 and std 1 over its own region,
then `base + CONTRAST * texture` is painted on all channels. Only the spectrum differs: the
background has periods of `BACKGROUND_PERIODS` pixels, the object `OBJECT_PERIODS`. So there is no
colour or brightness edge at the object's boundary (unless `tint` adds a subtle colour shift),
only a change of texture frequency, which is
what makes camouflaged objects hard for SAM (SAM-Adapter, arXiv 2304.09148, Fig. 1) and what a
frequency-aware adapter can learn (CAD feeds an FFT high-pass of the image to its CNN). The mask
is exact: pixels are painted through it, and it is written as a 0/255 PNG.

Image `i` of a split has its own random stream `(seed, split, i)`, so adding images changes no
other; even indices are square `size x size`, odd ones landscape `(3 * size // 4) x size`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from eval.scenes.synthetic import write_coco_json
from teachers.mask_folders import list_pairs, load_pair

# Periods (pixels per cycle) of the two textures' pass bands.
BACKGROUND_PERIODS = (10.0, 20.0)
OBJECT_PERIODS = (3.0, 5.0)
CONTRAST = 18.0  # texture std in gray levels, on every channel
BASE_RANGE = (70, 186)  # per-channel base colour; base +- 3.5 std stays inside 0..255
SPLITS = {"train": 0, "val": 1}
VERSION = 1


def band_noise(
    rng: np.random.Generator, hw: tuple[int, int], periods: tuple[float, float]
) -> np.ndarray:
    """[H, W] float64 Gaussian noise keeping only frequencies with period in `periods` (pixels),
    by zeroing the rest of its 2-D FFT (an ideal annular band-pass)."""
    h, w = hw
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    radius = np.hypot(fy, fx)  # cycles per pixel
    keep = (radius >= 1.0 / periods[1]) & (radius <= 1.0 / periods[0])
    spectrum = np.fft.rfft2(rng.standard_normal(hw)) * keep
    return np.fft.irfft2(spectrum, s=hw)


def _standardize(x: np.ndarray, region: np.ndarray) -> np.ndarray:
    """`x` shifted and scaled to mean 0, std 1 over the pixels of `region`."""
    values = x[region]
    return (x - values.mean()) / values.std()


def blob_mask(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """[H, W] bool blob: pixel centres within r(theta) = R (1 + sum_k a_k cos(k theta + phi_k)),
    k = 2..4, a_k < 0.15, of a centre in the middle 40 % of the image; R is 15-30 % of the short
    side, so the smallest radius is over 8 % of it and the blob is never empty."""
    h, w = hw
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    base = rng.uniform(0.15, 0.3) * min(h, w)
    amps, phases = rng.uniform(0.0, 0.15, 3), rng.uniform(0.0, 2 * np.pi, 3)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    theta = np.arctan2(yy - cy, xx - cx)
    radius = base * (1 + sum(a * np.cos(k * theta + p) for k, a, p in zip((2, 3, 4), amps, phases)))
    return np.hypot(xx - cx, yy - cy) <= radius


def domain_sample(
    seed: int, split: str, index: int, size: int, tint: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of `split`: (pixels [H, W, 3] uint8 RGB, mask [H, W] bool). `tint` shifts
    the object's colour by +-tint gray levels per channel (signs drawn per image)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    hw = (size, size) if index % 2 == 0 else (3 * size // 4, size)
    mask = blob_mask(rng, hw)
    texture = np.where(
        mask,
        _standardize(band_noise(rng, hw, OBJECT_PERIODS), mask),
        _standardize(band_noise(rng, hw, BACKGROUND_PERIODS), ~mask),
    )
    base = rng.integers(BASE_RANGE[0], BASE_RANGE[1], 3)
    pixels = base[None, None, :] + CONTRAST * texture[..., None]
    if tint:
        pixels = pixels + mask[..., None] * tint * rng.choice([-1.0, 1.0], 3)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8), mask


def write_pair(
    root: Path, split: str, index: int, pixels: np.ndarray, mask: np.ndarray, suffix: str
) -> None:
    """Image `index` of `split` and its 0/255 mask PNG, named as `teachers.mask_folders` pairs
    them (`{split}_{index:05d}`); JPEG at quality 95, or PNG."""
    for sub in ("images", "masks"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    name = f"{split}_{index:05d}"
    image = Image.fromarray(pixels)
    if suffix == ".jpg":
        image.save(root / split / "images" / f"{name}.jpg", "JPEG", quality=95)
    else:
        image.save(root / split / "images" / f"{name}.png", "PNG")
    Image.fromarray(mask.astype(np.uint8) * 255).save(root / split / "masks" / f"{name}.png")


def write_domain(
    root: str | Path,
    num_train: int,
    num_val: int,
    size: int,
    image_suffix: str,
    sample,
    params: dict,
) -> Path:
    """Check the sizes, write `sample(split, i) -> (pixels, mask)` for i < num of each split with
    `write_pair`, then root/domain.json with `params`; return `root`."""
    if num_train < 0 or num_val < 0 or num_train + num_val == 0:
        raise ValueError(f"need num_train, num_val >= 0 and not both 0, got {num_train}, {num_val}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if image_suffix not in (".png", ".jpg"):
        raise ValueError(f"image_suffix {image_suffix!r}: choose .png or .jpg")
    root = Path(root)
    for split, num in (("train", num_train), ("val", num_val)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(num):
            write_pair(root, split, i, *sample(split, i), image_suffix)
    (root / "domain.json").write_text(json.dumps(params, indent=1))
    return root


def make_domain(
    root: str | Path,
    num_train: int = 16,
    num_val: int = 8,
    seed: int = 0,
    *,
    size: int = 160,
    image_suffix: str = ".png",
    tint: float = 0.0,
) -> Path:
    """Write the camouflage domain (layout in the module doc) under `root` and return `root`.

    size: the long side in pixels (at least 32). image_suffix: ".png" (lossless, the default, so
    the texture statistics hold to the pixel) or ".jpg" (quality 95, like the real datasets).
    tint: a colour cue besides the texture (see `domain_sample`), 0 for none: an encoder whose
    features see no texture frequency (a small random one) can still find the object by it.
    """
    params = dict(
        generator="eval.scenes.domain",
        version=VERSION,
        seed=seed,
        size=size,
        num_train=num_train,
        num_val=num_val,
        background_periods=BACKGROUND_PERIODS,
        object_periods=OBJECT_PERIODS,
        contrast=CONTRAST,
        tint=tint,
    )
    return write_domain(
        root,
        num_train,
        num_val,
        size,
        image_suffix,
        lambda split, i: domain_sample(seed, split, i, size, tint),
        params,
    )


def domain_as_coco(root: str | Path, split: str, out: str | Path) -> Path:
    """Write split `split` of the domain at `root` as a COCO-format dataset under `out` (images in
    out/val2017, out/annotations/instances_val2017.json): one instance per image, its mask as RLE,
    its box the mask's tight box, one category "object". Images are copied unchanged; pairs are
    read and checked by `teachers.mask_folders`. Returns the json path, which
    `teachers.cache.plan_cache` and `eval/coco.py` read like COCO's."""
    pairs = list_pairs(root, split)
    if not pairs:
        raise ValueError(f"{Path(root) / split / 'images'}: no images")
    out = Path(out)
    (out / "val2017").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, pair in enumerate(pairs, start=1):
        _, mask = load_pair(pair)
        (out / "val2017" / pair.image.name).write_bytes(pair.image.read_bytes())
        h, w = mask.shape
        images.append({"id": i, "file_name": pair.image.name, "height": h, "width": w})
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        box = [float(v) for v in mask_utils.toBbox(rle)]
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append(
            {
                "id": i,
                "image_id": i,
                "category_id": 1,
                "bbox": box,
                "area": float(mask.sum()),
                "iscrowd": 0,
                "segmentation": rle,
            }
        )
    categories = [{"id": 1, "name": "object", "supercategory": "object"}]
    path = out / "annotations" / "instances_val2017.json"
    return write_coco_json(path, images, annotations, categories)
