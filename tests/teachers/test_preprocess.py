import io

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor

from teachers import decode_image, preprocess
from teachers.preprocess import valid_mask

# (height, width, PIL mode): portrait, landscape, square, extreme aspect, grayscale, RGBA, palette.
CASES = [
    (97, 143, "RGB"),
    (160, 90, "RGB"),
    (64, 64, "RGB"),
    (31, 250, "L"),
    (200, 133, "RGBA"),
    (77, 51, "P"),
]


def _encoded(h: int, w: int, mode: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(rgb).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if mode != "RGB" else "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("h,w,mode", CASES)
def test_preprocess_equals_sam_predictor_input(tiny_sam, h, w, mode):
    image = decode_image(_encoded(h, w, mode, seed=h * w))
    seen = {}
    hook = tiny_sam.image_encoder.register_forward_pre_hook(
        lambda m, a: seen.update(x=a[0].clone())
    )
    try:
        SamPredictor(tiny_sam).set_image(image)
    finally:
        hook.remove()
    size = tiny_sam.image_encoder.img_size
    ours = preprocess(image, size)
    assert ours.image.dtype == torch.float32
    assert torch.equal(ours.image, seen["x"][0])  # bit for bit
    assert ours.orig_hw == (h, w)
    long = max(h, w)
    assert max(ours.input_hw) == size
    assert ours.input_hw == (int(h * size / long + 0.5), int(w * size / long + 0.5))
    # Padding is exact zeros outside the resized region.
    assert ours.image[:, ours.input_hw[0] :, :].abs().sum() == 0
    assert ours.image[:, :, ours.input_hw[1] :].abs().sum() == 0


def test_decode_converts_modes_to_rgb():
    for mode in ("L", "RGBA", "P"):
        assert decode_image(_encoded(10, 12, mode, 0)).shape == (10, 12, 3)


def test_preprocess_rejects_wrong_layout():
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess(np.zeros((4, 4), np.uint8), 64)
    with pytest.raises(ValueError, match="cannot decode image broken.jpg"):
        decode_image(b"not an image", "broken.jpg")


def test_valid_mask_counts_partly_padded_cells():
    m = valid_mask((100, 33), img_size=128, patch_size=16)
    assert m.shape == (8, 8)
    assert m.sum() == 7 * 3  # ceil(100/16)=7 rows, ceil(33/16)=3 columns
    assert m[6, 2] and not m[7, 0] and not m[0, 3]
