import collections
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from teachers import load_teacher, preprocess, read_checkpoint
from teachers.build import build_vit_tiny, load_sam_checkpoint


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reference_sam(ckpt):
    """SAM built and loaded the plain upstream way, independent of our loader."""
    sam = build_vit_tiny()
    sam.load_state_dict(torch.load(ckpt, weights_only=True))
    return sam.eval()


@pytest.mark.parametrize("h,w", [(120, 90), (64, 200)])
def test_final_embedding_equals_sam_predictor(tiny_ckpt, h, w):
    image = _image(h, w, seed=h)
    predictor = SamPredictor(_reference_sam(tiny_ckpt))
    predictor.set_image(image)
    expected = predictor.get_image_embedding()

    teacher = load_teacher("vit_tiny", tiny_ckpt, taps=(1, 3))
    out = teacher(preprocess(image, teacher.img_size).image[None])
    assert out["embed"].shape == expected.shape == (1, 256, 16, 16)
    assert torch.equal(out["embed"], expected)
    assert out["block1"].shape == out["block3"].shape == (1, 16, 16, 64)


def test_taps_are_block_outputs(tiny_ckpt, tiny_sam):
    teacher = load_teacher("vit_tiny", tiny_ckpt, taps=(0, 2))
    x = preprocess(_image(50, 70, 3), 256).image[None]
    out = teacher(x)
    enc = tiny_sam.image_encoder
    with torch.no_grad():
        h = enc.patch_embed(x) + enc.pos_embed
        h0 = enc.blocks[0](h)
        h2 = enc.blocks[2](enc.blocks[1](h0))
    assert torch.allclose(out["block0"], h0, atol=1e-6)
    assert torch.allclose(out["block2"], h2, atol=1e-6)


def test_bf16_teacher_is_close_to_fp32(tiny_ckpt):
    x = preprocess(_image(90, 90, 5), 256).image[None]
    ref = load_teacher("vit_tiny", tiny_ckpt, taps=())(x)["embed"]
    low = load_teacher("vit_tiny", tiny_ckpt, taps=(), dtype="bf16")(x)["embed"]
    assert low.dtype == torch.float32
    err = (low - ref).abs().max().item()
    # measured 0.97% of max |x| (4.3e-2 of 4.4); 10x margin
    assert 0 < err < 0.1 * ref.abs().max().item()


def test_teacher_is_frozen(tiny_ckpt):
    teacher = load_teacher("vit_tiny", tiny_ckpt)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.image_encoder.training
    out = teacher(torch.randn(1, 3, 256, 256, requires_grad=True))
    assert not out["embed"].requires_grad


def test_random_vit_tiny_without_checkpoint_warns(capsys):
    a = load_teacher("vit_tiny", taps=())
    assert "RANDOM weights" in capsys.readouterr().err
    b = load_teacher("vit_tiny", taps=())
    assert torch.equal(a.image_encoder.pos_embed, b.image_encoder.pos_embed)  # seeded
    with pytest.raises(ValueError, match="vit_h needs --teacher-ckpt"):
        load_teacher("vit_h")


def test_bad_taps_and_names(tiny_ckpt):
    with pytest.raises(ValueError, match=r"taps \[9\] out of range"):
        load_teacher("vit_tiny", tiny_ckpt, taps=(1, 9))
    with pytest.raises(ValueError, match="unknown teacher 'vit_x'"):
        load_teacher("vit_x", tiny_ckpt)


# --- strict, safe checkpoint loading -------------------------------------------------------


def _save_changed(path: Path, tiny_sam, changes: dict) -> Path:
    """tiny_sam's state dict, copied, with `changes` (key -> new value, or None to remove the
    key), saved at `path` in the official layout."""
    state = collections.OrderedDict((k, v.clone()) for k, v in tiny_sam.state_dict().items())
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    torch.save(state, path)
    return path


def test_missing_key_is_named(tmp_path, tiny_sam):
    path = _save_changed(tmp_path / "missing.pth", tiny_sam, {"image_encoder.neck.0.weight": None})
    with pytest.raises(
        ValueError,
        match=r"missing.pth does not match SAM vit_tiny: missing keys: image_encoder\.neck\.0\.weight",
    ):
        load_teacher("vit_tiny", path)


def test_unexpected_key_is_named(tmp_path, tiny_sam):
    extra = {"image_encoder.extra.weight": torch.zeros(3)}
    path = _save_changed(tmp_path / "extra.pth", tiny_sam, extra)
    with pytest.raises(ValueError, match=r"unexpected keys: image_encoder\.extra\.weight"):
        load_teacher("vit_tiny", path)


def test_wrong_architecture_names_shape_mismatch(tmp_path, tiny_sam):
    wrong = {"mask_decoder.iou_token.weight": torch.zeros(1, 128)}
    path = _save_changed(tmp_path / "shape.pth", tiny_sam, wrong)
    with pytest.raises(
        ValueError,
        match=r"shape mismatches: mask_decoder\.iou_token\.weight \(1, 128\) != \(1, 256\)",
    ):
        load_sam_checkpoint("vit_tiny", path)


class Payload:
    """Any non-tensor object: a weights_only load must refuse it."""


def test_pickled_object_is_refused(tmp_path, tiny_sam):
    path = _save_changed(tmp_path / "pickled.pth", tiny_sam, {"image_encoder.evil": Payload()})
    with pytest.raises(
        ValueError,
        match=r"pickled.pth: refusing to load: the file holds a pickled object \(.*Payload\)",
    ):
        read_checkpoint(path)


def test_non_tensor_entries_and_garbage_are_refused(tmp_path):
    path = tmp_path / "train.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(ValueError, match="non-tensor entries.*a training checkpoint"):
        read_checkpoint(path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.pth: not a readable torch checkpoint"):
        read_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pth")


def test_meta_loading_restores_pixel_buffers(tiny_ckpt, tiny_sam):
    sam = load_sam_checkpoint("vit_tiny", tiny_ckpt)
    assert torch.equal(sam.pixel_mean, tiny_sam.pixel_mean)
    assert not any(t.is_meta for t in list(sam.parameters()) + list(sam.buffers()))


def test_mapped_read_gives_the_same_tensors(tiny_ckpt):
    mapped, read = read_checkpoint(tiny_ckpt, mmap=True), read_checkpoint(tiny_ckpt)
    assert mapped.keys() == read.keys()
    assert all(torch.equal(mapped[k], read[k]) for k in read)
