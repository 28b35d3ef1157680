"""Frozen SAM teachers built through `segment_anything` from the official checkpoint files.

Official checkpoints (`sam_vit_h_4b8939.pth`, `sam_vit_l_0b3195.pth`, `sam_vit_b_01ec64.pth`) are
flat state dicts with `image_encoder.*`, `prompt_encoder.*` and `mask_decoder.*` keys. `vit_tiny`
is a small random-weight architecture with the same key layout, for fast tests; `sam_mini` is the
reference teacher this project trains and ships (`teachers/sam_mini.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from teachers.preprocess import PIXEL_MEAN, PIXEL_STD
from teachers.runtime.files import read_checkpoint
from teachers.sam_mini import (
    SAM_MINI_DEPTH,
    SAM_MINI_GLOBAL,
    SAM_MINI_HEADS,
    SAM_MINI_IMG_SIZE,
    SAM_MINI_WIDTH,
    SAM_MINI_WINDOW,
)

TEACHER_NAMES = ("vit_h", "vit_l", "vit_b", "vit_tiny", "sam_mini")
# SAM's global-attention blocks: the natural layer-wise distillation targets.
DEFAULT_TAPS = {
    "vit_h": (7, 15, 23, 31),
    "vit_l": (5, 11, 17, 23),
    "vit_b": (2, 5, 8, 11),
    "vit_tiny": (1, 3),
    "sam_mini": SAM_MINI_GLOBAL,
}
# (block width, depth) of each teacher's image encoder.
TEACHER_SIZES = {
    "vit_h": (1280, 32),
    "vit_l": (1024, 24),
    "vit_b": (768, 12),
    "vit_tiny": (64, 4),
    "sam_mini": (SAM_MINI_WIDTH, SAM_MINI_DEPTH),
}
VIT_TINY_SEED = 0
VIT_TINY_IMG_SIZE = 256


def build_vit_tiny(img_size: int = VIT_TINY_IMG_SIZE) -> Sam:
    """A 4-block, 64-wide SAM with the official key layout and SAM's prompt encoder and decoder.

    Sizes follow `segment_anything/build_sam.py` in miniature: windowed blocks with two global
    blocks, relative positions, the 256-channel neck.
    """
    if img_size % 16:
        raise ValueError(f"vit_tiny img_size must be a multiple of 16, got {img_size}")
    encoder = ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=64,
        depth=4,
        num_heads=2,
        mlp_ratio=4.0,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=(1, 3),
    )
    return Sam(
        encoder, *sam_heads(img_size), pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD)
    )


def build_sam_mini(img_size: int = SAM_MINI_IMG_SIZE) -> Sam:
    """The reference teacher's architecture with fresh weights (sizes in `teachers.sam_mini`):
    SAM's ViT with windowed and two global blocks, and SAM's own prompt encoder and decoder."""
    if img_size % 16:
        raise ValueError(f"sam_mini img_size must be a multiple of 16, got {img_size}")
    encoder = ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=SAM_MINI_WIDTH,
        depth=SAM_MINI_DEPTH,
        num_heads=SAM_MINI_HEADS,
        mlp_ratio=4.0,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        rel_pos_zero_init=True,
        window_size=SAM_MINI_WINDOW,
        global_attn_indexes=SAM_MINI_GLOBAL,
    )
    return Sam(
        encoder, *sam_heads(img_size), pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD)
    )


def sam_heads(img_size: int = 1024) -> tuple[PromptEncoder, MaskDecoder]:
    """SAM's prompt encoder and mask decoder for `img_size` inputs, as `build_sam.py` makes them."""
    grid = img_size // 16
    prompt = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt, decoder


_BUILDERS: dict[str, Callable[[], Sam]] = {
    "vit_h": sam_model_registry["vit_h"],
    "vit_l": sam_model_registry["vit_l"],
    "vit_b": sam_model_registry["vit_b"],
    "vit_tiny": build_vit_tiny,
    "sam_mini": build_sam_mini,
}


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHER_NAMES)}")


def random_vit_tiny(seed: int = VIT_TINY_SEED) -> Sam:
    """`vit_tiny` with seeded random weights (positional embedding included), without touching
    the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_vit_tiny()
        torch.nn.init.trunc_normal_(sam.image_encoder.pos_embed, std=0.02)
    return sam.eval()


def _list(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def check_state_dict(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str, source: str
) -> None:
    """Raise ValueError naming missing keys, unexpected keys and shape mismatches."""
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in reference.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_list(shapes, 4)}")
    if problems:
        raise ValueError(f"{source} does not match {what}: " + "; ".join(problems))


# Image-encoder width -> architecture, to recognise an official checkpoint by its contents.
_WIDTHS = {width: name for name, (width, _) in TEACHER_SIZES.items()}


def sam_name_from_state(state: dict[str, torch.Tensor], source: str) -> str:
    """Recognise vit_h/vit_l/vit_b/vit_tiny from an official-layout state dict."""
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None or weight.shape[0] not in _WIDTHS:
        raise ValueError(
            f"{source}: not an official SAM checkpoint (no image_encoder.patch_embed.proj.weight "
            f"of width {', '.join(map(str, _WIDTHS))})"
        )
    return _WIDTHS[weight.shape[0]]


def load_sam_checkpoint(name: str | None, checkpoint: str | Path) -> Sam:
    """Build SAM `name` and load an official-layout checkpoint strictly (weights_only=True).

    name None recognises the architecture from the file.

    The model is built on the meta device and the checkpoint tensors are assigned in place, so
    ViT-H is not randomly initialised first (that alone takes tens of seconds on a CPU).
    """
    return sam_from_state(name, read_checkpoint(checkpoint), str(checkpoint))


def sam_from_state(name: str | None, state: dict[str, torch.Tensor], source: str) -> Sam:
    """`load_sam_checkpoint` for a state dict already read from `source`."""
    name = sam_name_from_state(state, source) if name is None else name
    _check_name(name)
    builder = _BUILDERS[name]
    pos = state.get("image_encoder.pos_embed")
    if name == "vit_tiny" and pos is not None and pos.ndim == 4:
        # vit_tiny is used at several test sizes; its grid is read off the file.
        builder = partial(build_vit_tiny, img_size=pos.shape[1] * 16)
    with torch.device("meta"):
        sam = builder()
    check_state_dict(state, sam.state_dict(), f"SAM {name}", source)
    # The shipped sam_mini stores fp16 tensors (half the bytes); every model here runs in fp32.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    sam.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers are not in the file: rebuild them on the CPU.
    sam.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
    sam.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)
    return sam.eval()
