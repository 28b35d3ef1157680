"""The one image preprocessing shared by the cache, training and evaluation.

It reproduces what `segment_anything.SamPredictor.set_image` feeds the image encoder, bit for bit:
`ResizeLongestSide.apply_image` (PIL bilinear resize of the long side to `img_size`), normalisation
with SAM's `pixel_mean`/`pixel_std` on the 0-255 scale, zero padding at the bottom and right.
The teacher, the student and the evaluation must all see exactly these pixels, so nothing else in
the project resizes or normalises images.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

# SAM's constants (segment_anything/build_sam.py); float32 like Sam's buffers.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# Bumped whenever the function below changes what it returns; recorded in cache manifests.
PREPROCESS_VERSION = 1
# PIL's modes of 16-bit grayscale files (PNG opens as "I;16" or, in older Pillow, "I")
WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessed:
    """One preprocessed image.

    image: [3, img_size, img_size] float32, normalised and padded.
    orig_hw: (H, W) of the decoded source image.
    input_hw: (h, w) of the resized image before padding (the valid region of `image`).
    """

    image: torch.Tensor
    orig_hw: tuple[int, int]
    input_hw: tuple[int, int]


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to an [H, W, 3] uint8 RGB array.

    Grayscale, palette and RGBA images are converted to RGB by PIL (alpha is dropped); 16-bit
    grayscale ones (PNG, TIFF) are scaled by their range to 8 bits first, with a warning. The EXIF
    orientation tag is ignored: pixels are used as stored, which is how COCO annotations and
    SAM's reference evaluation (PIL `Image.open(...).convert("RGB")`) address them.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode in WIDE_GRAY_MODES:
                return _wide_gray_to_rgb(np.asarray(img), name)
            return np.asarray(img.convert("RGB"))
    except Exception as err:  # PIL raises several unrelated types for broken files
        raise ValueError(f"cannot decode image {name}: {err}") from err


def _wide_gray_to_rgb(gray: np.ndarray, name: str) -> np.ndarray:
    """A 16-bit grayscale image scaled by its type's range to 8 bits (value * 255 / 65535,
    rounded), as RGB: PIL's own conversion clips at 255, which turns it near-white."""
    log.warning("%s: a 16-bit grayscale image, scaled to 8 bits (value * 255 / 65535)", name)
    scaled = np.clip(np.rint(gray.astype(np.float64) * (255 / 65535)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(scaled[..., None], 3, axis=2))


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file into an [H, W, 3] uint8 RGB array (see `decode_image`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return decode_image(path.read_bytes(), str(path))


def preprocess(image: np.ndarray, img_size: int = 1024) -> Preprocessed:
    """Resize, normalise and pad one [H, W, 3] uint8 RGB image for a SAM-style encoder.

    Equals `Sam.preprocess(ResizeLongestSide(img_size).apply_image(image))` bit for bit.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"preprocess expects an [H, W, 3] uint8 RGB array, got {image.dtype} {image.shape}"
        )
    resized = ResizeLongestSide(img_size).apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32).view(-1, 1, 1)
    x = (x - mean) / std
    h, w = x.shape[-2:]
    x = F.pad(x, (0, img_size - w, 0, img_size - h))
    return Preprocessed(x, (int(image.shape[0]), int(image.shape[1])), (int(h), int(w)))


def valid_mask(input_hw: tuple[int, int], img_size: int, patch_size: int = 16) -> torch.Tensor:
    """[img_size/patch, img_size/patch] bool mask of embedding cells that cover real pixels.

    A cell counts when any of its pixels is inside the unpadded `input_hw` region (ceil division),
    so partly padded border cells are kept.
    """
    grid = img_size // patch_size
    rows = -(-input_hw[0] // patch_size)
    cols = -(-input_hw[1] // patch_size)
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    mask[:rows, :cols] = True
    return mask
