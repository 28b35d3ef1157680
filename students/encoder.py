"""The DFA student image encoder: a plain ViT with Dilated Flash Attention and SAM's neck.

Layout follows ``segment_anything/modeling/image_encoder.py`` (``ImageEncoderViT``): a 16x16
patch embedding, an absolute position embedding, blocks on ``[B, H, W, C]`` tokens, and the neck
Conv1x1 -> LayerNorm2d -> Conv3x3 -> LayerNorm2d to 256 channels, so the output plugs into SAM's
prompt encoder and mask decoder and the parameter names match SAM's where the parts match.
Blocks are either DFA blocks (pre-norm attention + MLP, as SAM's ``Block``) or MLP-only blocks
(FastSAM3D's ``Block3D_woatt`` in ``image_encoder3D_dilatedattention.py``: the first blocks skip
attention, which is cheap where features are still local).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.image_encoder import PatchEmbed
from torch import Tensor, nn

from students.dfa import Backend, DilatedFlashAttention, Layout
from students.registry import register_student


class DFABlock(nn.Module):
    """Pre-norm DFA attention + MLP with residuals; ``[B, H, W, C] -> [B, H, W, C]``.

    ``mlp_dim`` (default ``int(dim * mlp_ratio)``) and ``head_dim`` (default ``dim // num_heads``)
    are set by pruned students, whose blocks keep fewer hidden units or heads.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        patterns: Sequence[Sequence[int]],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layout: Layout = "2d",
        backend: Backend = "auto",
        *,
        mlp_dim: int | None = None,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DilatedFlashAttention(
            dim, num_heads, patterns, qkv_bias, layout, backend, head_dim=head_dim
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio) if mlp_dim is None else mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MLPOnlyBlock(nn.Module):
    """Pre-norm MLP with a residual and no token mixing; ``[B, H, W, C] -> [B, H, W, C]``."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, *, mlp_dim: int | None = None) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio) if mlp_dim is None else mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm2(x))


class DFAEncoder(nn.Module):
    """Student image encoder: ``[B, 3, S, S] -> [B, out_chans, S/16, S/16]``.

    Args:
        img_size: input side the position embedding is stored for; other sides (multiples of
            ``patch_size``) interpolate it. SAM's code reads this attribute.
        patch_size: patch side and stride of the patch embedding.
        in_chans: input channels.
        embed_dim: token width C.
        depth: number of blocks.
        num_heads: attention heads in DFA blocks.
        mlp_ratio: MLP hidden width / C.
        out_chans: neck output channels (256 for SAM's mask decoder).
        patterns: (segment w, dilation r) pairs of every DFA block (see ``students.dfa``).
        mlp_only_blocks: indices of blocks without attention.
        block_patterns: optional per-block patterns, ``depth`` entries; overrides ``patterns``
            (an entry is ignored for an MLP-only block).
        layout: ``"2d"`` square tiles on the grid or ``"1d"`` flattened segments.
        backend: ``"auto"``, ``"fused"`` or ``"reference"`` attention (see ``dilated_attention``).
        qkv_bias: bias on the qkv projection.
        block_heads: optional heads of every block, ``depth`` entries (an entry is ignored for
            an MLP-only block); default ``num_heads`` everywhere. Set by head pruning
            (``students.prune``), with ``head_dim`` kept at the unpruned ``embed_dim // num_heads``.
        block_mlp_dims: optional MLP hidden width of every block, ``depth`` entries; default
            ``int(embed_dim * mlp_ratio)`` everywhere. Set by MLP pruning.
        head_dim: width of one attention head; default ``embed_dim // num_heads``.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 8,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        patterns: Sequence[Sequence[int]] = ((8, 1), (32, 2)),
        mlp_only_blocks: Sequence[int] = (0, 1),
        block_patterns: Sequence[Sequence[Sequence[int]]] | None = None,
        layout: Layout = "2d",
        backend: Backend = "auto",
        qkv_bias: bool = True,
        block_heads: Sequence[int] | None = None,
        block_mlp_dims: Sequence[int] | None = None,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        per_block = _per_block_patterns(depth, patterns, mlp_only_blocks, block_patterns)
        heads = _per_block_sizes("block_heads", block_heads, depth, num_heads)
        mlp_dims = _per_block_sizes(
            "block_mlp_dims", block_mlp_dims, depth, int(embed_dim * mlp_ratio)
        )
        if img_size % patch_size != 0:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        if head_dim is None and embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        head_dim = embed_dim // num_heads if head_dim is None else head_dim
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(
            kernel_size=(patch_size, patch_size),
            stride=(patch_size, patch_size),
            in_chans=in_chans,
            embed_dim=embed_dim,
        )
        grid = img_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            MLPOnlyBlock(embed_dim, mlp_ratio, mlp_dim=mlp_dim)
            if block is None
            else DFABlock(
                embed_dim,
                nh,
                block,
                mlp_ratio,
                qkv_bias,
                layout,
                backend,
                mlp_dim=mlp_dim,
                head_dim=head_dim,
            )
            for block, nh, mlp_dim in zip(per_block, heads, mlp_dims, strict=True)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, S, S] -> [B, out_chans, S/16, S/16]``."""
        return self.forward_features(x)[0]

    def forward_features(
        self, x: Tensor, taps: Sequence[int] = ()
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Final embedding ``[B, out_chans, h, w]`` and ``{block_index: [B, h, w, C]}``.

        ``taps`` are block indices (0-based, ``-1`` is the last block); the dict is keyed by the
        non-negative index. A tap is the block's output, before the neck, as for SAM's blocks.
        """
        wanted = self._check_taps(taps)
        if x.dim() != 4 or x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(
                f"expected input [B, C, H, W] with H and W multiples of {self.patch_size}, "
                f"got {tuple(x.shape)}"
            )
        x = self.patch_embed(x)  # [B, h, w, C]
        x = x + self._pos_embed(x.shape[1], x.shape[2])
        features = {}
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in wanted:
                features[index] = x
        return self.neck(x.permute(0, 3, 1, 2)), features

    def _check_taps(self, taps: Sequence[int]) -> set[int]:
        depth = len(self.blocks)
        bad = [t for t in taps if not -depth <= t < depth]
        if bad:
            raise ValueError(f"taps {bad} out of range for a student with {depth} blocks")
        return {t % depth for t in taps}

    def _pos_embed(self, h: int, w: int) -> Tensor:
        """Position embedding ``[1, h, w, C]``, bicubic-resized when the grid differs."""
        if self.pos_embed.shape[1:3] == (h, w):
            return self.pos_embed
        pos = F.interpolate(
            self.pos_embed.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False
        )
        return pos.permute(0, 2, 3, 1)


def _per_block_patterns(
    depth: int,
    patterns: Sequence[Sequence[int]],
    mlp_only_blocks: Sequence[int],
    block_patterns: Sequence[Sequence[Sequence[int]]] | None,
) -> list[Sequence[Sequence[int]] | None]:
    """Patterns of each block, ``None`` for an MLP-only block; clear errors for bad arguments."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    bad = [i for i in mlp_only_blocks if not 0 <= i < depth]
    if bad:
        raise ValueError(f"mlp_only_blocks {bad} out of range for depth={depth}")
    if block_patterns is not None and len(block_patterns) != depth:
        raise ValueError(
            f"block_patterns has {len(block_patterns)} entries, expected one per block ({depth})"
        )
    chosen = [patterns] * depth if block_patterns is None else list(block_patterns)
    return [None if i in set(mlp_only_blocks) else chosen[i] for i in range(depth)]


def _per_block_sizes(
    name: str, values: Sequence[int] | None, depth: int, default: int
) -> list[int]:
    """One size per block: ``values`` checked (``depth`` entries, each >= 1), or ``default``."""
    if values is None:
        return [default] * depth
    if len(values) != depth:
        raise ValueError(f"{name} has {len(values)} entries, expected one per block ({depth})")
    if any(int(v) < 1 for v in values):
        raise ValueError(f"{name} {list(values)}: every entry must be >= 1")
    return [int(v) for v in values]


def _build(sizes: dict[str, Any], overrides: dict[str, Any]) -> DFAEncoder:
    # ``tile`` (with ``dilation``, default 1) is one plain pattern for every DFA block, given as
    # numbers so that --student-options can ask for it: tile=8 is windowed attention only,
    # a tile as large as the grid (e.g. 64) is global attention (tiles are clipped to the grid).
    overrides = dict(overrides)
    if "tile" in overrides or "dilation" in overrides:
        if "tile" not in overrides:
            raise ValueError("dilation needs tile: give both, e.g. tile=32,dilation=2")
        overrides["patterns"] = [[int(overrides.pop("tile")), int(overrides.pop("dilation", 1))]]
    # Overriding ``patterns`` alone means "these patterns in every DFA block": drop the builder's
    # per-block choice instead of silently ignoring the override.
    if "patterns" in overrides and "block_patterns" not in overrides:
        sizes = {k: v for k, v in sizes.items() if k != "block_patterns"}
    return DFAEncoder(**{**sizes, **overrides})


# Sizes live only here; launch/bench/tables.py renders their parameters and GFLOPs into the
# docs, and launch/bench/speed.py measures their latency. Every DFA block
# mixes an 8x8 local tile (r = 1, covers every token and head) with a 32x32 tile dilated by 2
# (one head per (row, column) offset); the last DFA blocks swap the dilated tile for the whole
# 64x64 grid at 1024 input, so every token reaches the full image.
_LOCAL, _DILATED, _WIDE = (8, 1), (32, 2), (64, 2)


def _layout(depth: int, num_mlp_only: int, num_wide: int) -> dict[str, Any]:
    """FastSAM3D-style MLP-only blocks first, then DFA blocks, the last ``num_wide`` wide."""
    block_patterns = [[_LOCAL, _DILATED]] * (depth - num_wide) + [[_LOCAL, _WIDE]] * num_wide
    return dict(
        depth=depth,
        mlp_only_blocks=list(range(num_mlp_only)),
        block_patterns=[[list(p) for p in block] for block in block_patterns],
    )


@register_student
def dfa_t(**kwargs: Any) -> DFAEncoder:
    """Tiny: width 128, 6 blocks (2 MLP-only); 1.91 M params, 12.8 GFLOPs at 1024."""
    sizes = dict(embed_dim=128, num_heads=4, mlp_ratio=2.0, **_layout(6, 2, 1))
    return _build(sizes, kwargs)


@register_student
def dfa_s(**kwargs: Any) -> DFAEncoder:
    """Small, the default: width 192, 8 blocks (2 MLP-only); 4.24 M params, 31.8 GFLOPs at 1024,
    about MobileSAM's TinyViT budget in parameters and less than half its FLOPs."""
    sizes = dict(embed_dim=192, num_heads=4, mlp_ratio=3.0, **_layout(8, 2, 2))
    return _build(sizes, kwargs)


@register_student
def dfa_b(**kwargs: Any) -> DFAEncoder:
    """Base: width 256, 12 blocks (2 MLP-only), 8 heads; 9.28 M params, 74.9 GFLOPs at 1024."""
    sizes = dict(embed_dim=256, num_heads=8, mlp_ratio=3.0, **_layout(12, 2, 3))
    return _build(sizes, kwargs)
