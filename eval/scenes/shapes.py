"""Object outlines for the photo scenes: [h, w] bool masks of about a requested area.

Every generator takes `(rng, area, max_hw)`: it draws a shape, scales it to about `area` pixels
and shrinks it where needed so that its box fits in `max_hw` (height, width); the mask it returns
is cropped to the shape's tight box, so its `sum()` is the shape's exact pixel count. Edges are
hard (a pixel is in or out), so masks painted through are exact labels.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import data

ShapeFn = Callable[[np.random.Generator, float, tuple[float, float]], np.ndarray]


def _fit(
    area: float, unit_area: float, unit_hw: tuple[float, float], max_hw: tuple[float, float]
) -> float:
    """Scale of a unit shape (area `unit_area`, box `unit_hw`) that gives it `area` pixels,
    reduced so that its box fits in `max_hw`."""
    scale = np.sqrt(area / unit_area)
    return float(min(scale, max_hw[0] / unit_hw[0], max_hw[1] / unit_hw[1]))


def tight(mask: np.ndarray) -> np.ndarray:
    """The [h, w] bool `mask` cropped to the box of its True pixels (it must have one)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert rows.size, "empty shape"
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def ellipse(rng: np.random.Generator, area: float, max_hw: tuple[float, float]) -> np.ndarray:
    """An ellipse with axis ratio 0.35..1 at any orientation."""
    ratio, theta = rng.uniform(0.35, 1.0), rng.uniform(0.0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    half = (np.hypot(s, ratio * c), np.hypot(c, ratio * s))  # (y, x) half extents for a = 1
    a = _fit(area, np.pi * ratio, (2 * half[0], 2 * half[1]), max_hw)
    h, w = max(1, int(2 * half[0] * a)), max(1, int(2 * half[1] * a))
    yy, xx = np.ogrid[:h, :w]
    yy, xx = yy + 0.5 - h / 2, xx + 0.5 - w / 2  # pixel centres about the middle
    u, v = (xx * c + yy * s) / a, (yy * c - xx * s) / (ratio * a)
    mask = u * u + v * v <= 1.0
    mask[h // 2, w // 2] = True  # a sliver thinner than a pixel still has its centre pixel
    return tight(mask)


def polygon(rng: np.random.Generator, area: float, max_hw: tuple[float, float]) -> np.ndarray:
    """A convex polygon (3 to 10 vertices on an ellipse, in angular order) or a star (3 to 6
    spikes: radii alternate between 1 and 0.3..0.6), stretched and rotated."""
    if rng.random() < 0.5:
        n = int(rng.integers(3, 11))
        radius = np.ones(n)
    else:
        n = 2 * int(rng.integers(3, 7))
        radius = np.where(np.arange(n) % 2, rng.uniform(0.3, 0.6), 1.0)
    # Jitter under half a step keeps the vertices in angular order: the outline never crosses
    # itself, and vertices on an ellipse in that order make a convex polygon.
    t = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n
    ratio, theta = rng.uniform(0.5, 1.0), rng.uniform(0.0, np.pi)
    x, y = radius * np.cos(t), ratio * radius * np.sin(t)
    x, y = x * np.cos(theta) - y * np.sin(theta), x * np.sin(theta) + y * np.cos(theta)
    unit_area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace
    x, y = x - x.min(), y - y.min()
    scale = _fit(area, unit_area, (y.max(), x.max()), max_hw)
    h, w = max(1, int(np.ceil(y.max() * scale))), max(1, int(np.ceil(x.max() * scale)))
    img = Image.new("L", (w, h))
    # PIL's C rasteriser: 100x faster than skimage.draw.polygon here.
    ImageDraw.Draw(img).polygon(list(zip(x * scale, y * scale, strict=True)), fill=255)
    mask = np.asarray(img) > 0
    mask[min(int(y[0] * scale), h - 1), min(int(x[0] * scale), w - 1)] = True  # never empty
    return tight(mask)


def blob(rng: np.random.Generator, area: float, max_hw: tuple[float, float]) -> np.ndarray:
    """Thresholded smooth noise: 6x6 Gaussian noise upsampled bicubically over the box, plus a
    dome that pulls the blob to the middle, cut at the level that fills 35..55 % of the box; the
    largest connected piece."""
    ratio, fill = rng.uniform(0.5, 1.0), rng.uniform(0.35, 0.55)
    unit_hw = (ratio, 1.0) if rng.random() < 0.5 else (1.0, ratio)
    scale = _fit(area, fill * ratio, unit_hw, max_hw)
    h, w = max(2, int(unit_hw[0] * scale)), max(2, int(unit_hw[1] * scale))
    noise = Image.fromarray(rng.standard_normal((6, 6)).astype(np.float32), "F")
    field = np.asarray(noise.resize((w, h), Image.Resampling.BICUBIC))
    yy, xx = np.ogrid[:h, :w]
    r2 = ((2 * yy + 1) / h - 1) ** 2 + ((2 * xx + 1) / w - 1) ** 2  # 0 at the middle, 2 at corners
    field = field + 1.5 * (1.0 - r2)
    mask = field >= np.quantile(field[::4, ::4], 1.0 - fill)
    pieces, num = ndimage.label(mask)
    if num > 1:
        mask = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
    return tight(mask)


@lru_cache(maxsize=1)
def _horse() -> Image.Image:
    """scikit-image's horse silhouette (its True pixels are the background) as an 'L' 0/255
    image cropped to the horse, 256 pixels wide: big enough for smooth edges when upscaled."""
    mask = tight(~data.horse())
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return img.resize((256, round(256 * mask.shape[0] / mask.shape[1])), Image.Resampling.BILINEAR)


def silhouette(rng: np.random.Generator, area: float, max_hw: tuple[float, float]) -> np.ndarray:
    """The horse, rotated by up to 30 degrees, maybe mirrored, its aspect changed by up to 15 %."""
    img = _horse().rotate(rng.uniform(-30.0, 30.0), Image.Resampling.BILINEAR, expand=True)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    base = tight(np.asarray(img) > 127)
    stretch = rng.uniform(0.85, 1.15)
    unit_hw = (base.shape[0] * stretch, float(base.shape[1]))
    scale = _fit(area, float(base.sum()) * stretch, unit_hw, max_hw)
    h, w = max(1, int(unit_hw[0] * scale)), max(1, int(unit_hw[1] * scale))
    img = Image.fromarray(base.astype(np.uint8) * 255).resize((w, h), Image.Resampling.BILINEAR)
    mask = np.asarray(img) > 127
    mask[h // 2, w // 2] = True  # the horse's middle is its body; a tiny one keeps a pixel
    return tight(mask)


# Kind -> generator; the order is the COCO category order (ids 1..4).
SHAPES: dict[str, ShapeFn] = {
    "ellipse": ellipse,
    "polygon": polygon,
    "blob": blob,
    "silhouette": silhouette,
}
