"""The frozen teacher: a SAM image encoder that also returns tapped block outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from teachers.build import (
    DEFAULT_TAPS,
    TEACHER_NAMES,
    VIT_TINY_SEED,
    load_sam_checkpoint,
    random_vit_tiny,
)
from teachers.runtime.files import file_sha256

EMBED = "embed"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tap_name(block: int) -> str:
    """Name of a tapped block output in teacher outputs and cache samples."""
    return f"block{block}"


def feature_names(taps: list[int] | tuple[int, ...]) -> list[str]:
    """Every feature a teacher with these taps outputs and a cache sample stores: the final
    embedding first, then the tapped blocks in tap order."""
    return [EMBED] + [tap_name(t) for t in taps]


class Teacher(nn.Module):
    """A frozen SAM image encoder.

    Frozen by construction: parameters never require grad, `train()` keeps eval mode, and
    `forward` runs under `torch.no_grad()`.

    forward(x: [B, 3, S, S] float32) returns a dict of float32 tensors:
      "embed": the final image embedding [B, 256, S/16, S/16], exactly SAM's encoder output;
      "block{i}" for each tap i: the output of encoder block i, [B, S/16, S/16, C] (SAM's layout).
    """

    def __init__(
        self,
        name: str,
        image_encoder: ImageEncoderViT,
        taps: Sequence[int] = (),
        dtype: torch.dtype = torch.float32,
        checkpoint_sha256: str | None = None,
    ) -> None:
        super().__init__()
        depth = len(image_encoder.blocks)
        bad = [t for t in taps if not 0 <= t < depth]
        if bad:
            raise ValueError(
                f"taps {bad} out of range for {name} with {depth} blocks (0..{depth - 1})"
            )
        self.name = name
        self.taps = tuple(sorted(set(int(t) for t in taps)))
        self.dtype = dtype
        self.checkpoint_sha256 = checkpoint_sha256
        self.image_encoder = image_encoder.to(dtype)
        self.image_encoder.requires_grad_(False)
        self._captured: dict[str, torch.Tensor] = {}
        for t in self.taps:
            image_encoder.blocks[t].register_forward_hook(self._capture(tap_name(t)))
        super().train(False)

    def _capture(self, key: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self._captured[key] = output

        return hook

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def width(self) -> int:
        return self.image_encoder.patch_embed.proj.out_channels

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured = {}
        embed = self.image_encoder(x.to(self.dtype))
        out = {EMBED: embed.float()}
        out.update({k: v.float() for k, v in self._captured.items()})
        self._captured = {}
        return out


def load_teacher(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    taps: Sequence[int] | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> Teacher:
    """Build a frozen teacher from an official SAM checkpoint.

    taps: block indices whose outputs are returned; None takes the teacher's global-attention
    blocks (`DEFAULT_TAPS`), () none. `checkpoint` may be left out for `sam_mini` (the shipped
    reference teacher's weights) and for `vit_tiny` (seeded random weights); both say so on stderr.
    """
    if name not in TEACHER_NAMES:
        raise ValueError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHER_NAMES)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown teacher dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if checkpoint is None and name == "sam_mini":
        import sys

        from teachers.sam_mini import shipped_weights

        checkpoint = shipped_weights()
        print(f"sam_mini: the shipped reference teacher {checkpoint}", file=sys.stderr)
    if checkpoint is None:
        if name != "vit_tiny":
            raise ValueError(
                f"teacher {name} needs --teacher-ckpt (the official SAM checkpoint file)"
            )
        import sys

        print(
            f"WARNING: vit_tiny teacher with RANDOM weights (seed {VIT_TINY_SEED}); "
            "its features mean nothing beyond tests and the demo.",
            file=sys.stderr,
        )
        sam, sha = random_vit_tiny(), f"random-seed-{VIT_TINY_SEED}"
    else:
        sam, sha = load_sam_checkpoint(name, checkpoint), file_sha256(checkpoint)
    chosen = DEFAULT_TAPS[name] if taps is None else taps
    return Teacher(name, sam.image_encoder, chosen, dtype, sha).to(device)
