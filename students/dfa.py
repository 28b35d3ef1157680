"""Dilated Flash Attention (DFA): LongNet's dilated attention on the 2-D token grid of a ViT.

LongNet (arXiv 2307.02486, section 2.2) cuts the sequence into segments of length w, keeps every
r-th token inside a segment, gives each head group a different offset so that the heads together
see every token, runs dense attention inside every sparse segment, and merges the patterns
(w, r) with weights proportional to their softmax denominators. SAM-Lightening (arXiv 2403.09195)
runs this through FlashAttention kernels. Here a segment is a square ``w x w`` tile of the
``[H, W]`` patch grid and dilation keeps every r-th row and column of a tile, so a segment stays
local on the image; ``layout="1d"`` cuts the row-major flattened sequence instead, as LongNet does.

Layouts: ``q, k, v, out`` are ``[B, num_heads, H, W, head_dim]``; a module's input and output are
``[B, H, W, C]`` like SAM's ``ImageEncoderViT`` blocks.

Gradients. The fused kernels return the log-sum-exp (lse) but autograd does not differentiate
through it, while the mixing weights depend on it. torchscale's ``dilated_attention.py`` detaches
the weights; we keep the exact gradient instead (see ``students/fused.py``), so ``backend="fused"``
and ``backend="reference"`` agree in value and gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from students.dfa_union import union_attention, union_geometry
from students.fused import attention_with_lse, reference_attention

Layout = Literal["2d", "1d"]
Backend = Literal["auto", "fused", "reference", "union"]
BACKENDS = ("auto", "fused", "reference", "union")


def check_patterns(
    patterns: Sequence[Sequence[int]], num_heads: int, layout: Layout = "2d"
) -> tuple[tuple[int, int], ...]:
    """Validate (segment w, dilation r) patterns for ``num_heads`` heads; return them as tuples.

    Each pattern needs ``r**2`` head groups in 2-D (one per (row, column) offset) or ``r`` in 1-D,
    so ``num_heads`` must be a multiple of that count. Every (token, head) must be covered by at
    least one pattern, or the mixing weights would be undefined there (add a pattern with r = 1).
    """
    if layout not in ("2d", "1d"):
        raise ValueError(f"layout must be '2d' or '1d', got {layout!r}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if len(patterns) == 0:
        raise ValueError("patterns is empty: give at least one (segment, dilation) pair")
    checked = []
    for pattern in patterns:
        if len(pattern) != 2:
            raise ValueError(f"a pattern is a (segment, dilation) pair, got {pattern!r}")
        w, r = int(pattern[0]), int(pattern[1])
        if w < 1 or r < 1 or w % r != 0:
            raise ValueError(f"pattern (w={w}, r={r}): need w >= 1, r >= 1 and w a multiple of r")
        groups = r * r if layout == "2d" else r
        if num_heads % groups != 0:
            raise ValueError(
                f"pattern (w={w}, r={r}) in {layout} needs {groups} head groups (one per dilation "
                f"offset) but num_heads={num_heads} is not a multiple of {groups}; use a smaller "
                f"r or more heads"
            )
        checked.append((w, r))
    _check_coverage(checked, num_heads, layout)
    return tuple(checked)


def _check_coverage(patterns: Sequence[tuple[int, int]], num_heads: int, layout: Layout) -> None:
    # Coverage depends only on a token's position modulo r (tiles start at multiples of w, and
    # r divides w), so checking one lcm(r) period per axis decides it for every grid size.
    period = math.lcm(*(r for _, r in patterns))
    rows = range(period) if layout == "2d" else range(1)
    for head in range(num_heads):
        for y in rows:
            for x in range(period):
                if not any(_covers(p, head, num_heads, y, x, layout) for p in patterns):
                    raise ValueError(
                        f"patterns {list(patterns)} leave head {head} without attention at grid "
                        f"offset ({y}, {x}): add a pattern with dilation 1, e.g. (8, 1)"
                    )


def _covers(
    pattern: tuple[int, int], head: int, num_heads: int, y: int, x: int, layout: Layout
) -> bool:
    _, r = pattern
    groups = r * r if layout == "2d" else r
    group = head // (num_heads // groups)
    if layout == "1d":
        return x % r == group
    return (y % r, x % r) == divmod(group, r)


def _geometry(
    pattern: tuple[int, int], grid: tuple[int, int], layout: Layout
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Tile ``(th, tw)`` and dilation ``(ry, rx)`` on the grid the pattern cuts.

    A 1-D pattern is a 2-D one on a ``[1, H*W]`` grid with tile ``(1, w)`` and dilation
    ``(1, r)``. A tile larger than the grid is clamped to the grid rounded up to a multiple of r:
    the real tokens it holds are the same, so the result is unchanged and no padding is wasted.
    """
    w, r = pattern
    if layout == "1d":
        n = grid[0] * grid[1]
        return (1, grid[0] * grid[1]), (1, min(w, -(-n // r) * r)), (1, r)
    tiles = tuple(min(w, -(-g // r) * r) for g in grid)
    return grid, tiles, (r, r)


def _to_segments(x: Tensor, tile: tuple[int, int], dil: tuple[int, int]) -> Tensor:
    """``[B, nh, Hp, Wp, d]`` (padded) -> ``[B*G*nty*ntx, nh/G, L, d]``, G = ry*rx, L = th*tw/G.

    Head group g = (oy, ox) keeps rows oy, oy+ry, ... and columns ox, ox+rx, ... of every tile
    (torchscale's ``dense_to_sparse`` does this with a diagonal over (head group, offset), here in
    both axes). Batch order is (B, oy, ox, tile_y, tile_x) so one kernel call runs all segments.
    """
    b, nh, hp, wp, d = x.shape
    (th, tw), (ry, rx) = tile, dil
    x = x.view(b, ry, rx, nh // (ry * rx), hp // th, th // ry, ry, wp // tw, tw // rx, rx, d)
    # dims: b, gy, gx, hg, ty, my, oy, tx, mx, ox, d; keep gy == oy and gx == ox.
    x = x.diagonal(dim1=1, dim2=6)  # b, gx, hg, ty, my, tx, mx, ox, d, g_y
    x = x.diagonal(dim1=1, dim2=7)  # b, hg, ty, my, tx, mx, d, g_y, g_x
    x = x.permute(0, 7, 8, 2, 4, 1, 3, 5, 6)  # b, g_y, g_x, ty, tx, hg, my, mx, d
    return x.reshape(-1, x.shape[5], x.shape[6] * x.shape[7], d)


def _from_segments(
    out: Tensor,
    lse: Tensor | None,
    shape: tuple[int, ...],
    tile: tuple[int, int],
    dil: tuple[int, int],
) -> tuple[Tensor, Tensor | None]:
    """Inverse of ``_to_segments``, token-major: output ``[B, Hp, Wp, nh, d]``, lse
    ``[B, Hp, Wp, nh]``; output 0 and lse -inf where a head's offset skips a token (torchscale's
    ``sparse_to_dense`` uses -1e8; -inf gives an exact zero weight). Token-major, so that the
    merge and the output projection need no further transpose."""
    b, nh, hp, wp, d = shape
    (th, tw), (ry, rx) = tile, dil
    hg, nty, ntx, my, mx = nh // (ry * rx), hp // th, wp // tw, th // ry, tw // rx
    # [b, gy, gx, ty, tx, hg, my, mx] -> [b, ty, my, (oy), tx, mx, (ox), gy, gx, hg]
    out = out.view(b, ry, rx, nty, ntx, hg, my, mx, d).permute(0, 3, 6, 4, 7, 1, 2, 5, 8)
    out = out.unsqueeze(3).unsqueeze(6)
    if lse is not None:
        lse = lse.view(b, ry, rx, nty, ntx, hg, my, mx).permute(0, 3, 6, 4, 7, 1, 2, 5)
        lse = lse.unsqueeze(3).unsqueeze(6)
    if ry * rx > 1:
        # Place group (gy, gx) at offset (oy, ox) = (gy, gx): a product with the identity, as
        # torchscale's diag_embed, is one differentiable op and needs no in-place scatter.
        eye_y = torch.eye(ry, dtype=torch.bool, device=out.device)
        eye_x = torch.eye(rx, dtype=torch.bool, device=out.device)
        keep = eye_y.view(1, 1, 1, ry, 1, 1, 1, ry, 1, 1) & eye_x.view(
            1, 1, 1, 1, 1, 1, rx, 1, rx, 1
        )
        out = out * keep[..., None]
        lse = None if lse is None else torch.where(keep, lse, float("-inf"))
    return out.reshape(b, hp, wp, nh, d), None if lse is None else lse.reshape(b, hp, wp, nh)


def _padding_bias(
    grid: tuple[int, int],
    padded: tuple[int, int],
    tile: tuple[int, int],
    dil: tuple[int, int],
    batch: int,
    like: Tensor,
) -> Tensor:
    """Additive key bias ``[B*G*nty*ntx, 1, 1, L]``: 0 on real tokens, a huge negative on padding.

    Finite rather than -inf: a sparse segment that holds only padding (possible with dilation in
    the last tile) then gets a harmless uniform softmax instead of NaN; its queries are padding
    too and are cropped away, so real tokens never depend on padded ones.
    """
    groups = dil[0] * dil[1]
    real = torch.zeros(1, groups, *padded, 1, dtype=like.dtype, device=like.device)
    real[:, :, grid[0] :] = torch.finfo(like.dtype).min / 2
    real[:, :, :, grid[1] :] = torch.finfo(like.dtype).min / 2
    bias = _to_segments(real, tile, dil).transpose(-1, -2)
    return bias.repeat(batch, 1, 1, 1)


def _attend_pattern(
    q: Tensor, k: Tensor, v: Tensor, pattern: tuple[int, int], layout: Layout, kernel: str
) -> tuple[Tensor, Tensor | None]:
    """One pattern: ``[B, nh, H, W, d]`` -> (out ``[B, H, W, nh, d]``, lse ``[B, H, W, nh]``)."""
    # Plain ints: under ONNX tracing shapes are tensors, and the geometry must stay static.
    b, nh, h, w, d = (int(n) for n in q.shape)
    grid, tile, dil = _geometry(pattern, (h, w), layout)
    padded = tuple(-(-g // t) * t for g, t in zip(grid, tile, strict=True))

    def segments(x: Tensor) -> Tensor:
        x = x.reshape(b, nh, *grid, d)
        if padded != grid:
            x = F.pad(x, (0, 0, 0, padded[1] - grid[1], 0, padded[0] - grid[0]))
        return _to_segments(x, tile, dil)

    qs, ks, vs = segments(q), segments(k), segments(v)
    bias = None if padded == grid else _padding_bias(grid, padded, tile, dil, b, q)
    scale = d**-0.5
    if kernel == "sdpa":  # one pattern: no lse needed, let torch pick its best kernel
        out, lse = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias, scale=scale), None
    elif kernel == "reference":
        out, lse = reference_attention(qs, ks, vs, bias, scale)
    else:
        out, lse = attention_with_lse(qs, ks, vs, bias, scale)
    out, lse = _from_segments(out, lse, (b, nh, *padded, d), tile, dil)
    out = out[:, : grid[0], : grid[1]].reshape(b, h, w, nh, d)
    lse = None if lse is None else lse[:, : grid[0], : grid[1]].reshape(b, h, w, nh)
    return out, lse


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    patterns: Sequence[Sequence[int]],
    layout: Layout = "2d",
    backend: Backend = "auto",
) -> Tensor:
    """Dilated attention over a token grid: ``q, k, v [B, nh, H, W, d] -> [B, nh, H, W, d]``.

    Every pattern runs all its sparse segments in one batched kernel call; the patterns are
    merged with weights ``softmax_p(lse_p)`` per (token, head), which is LongNet's rule of
    weighting by softmax denominators (``exp(lse)``). ``backend``: ``"reference"`` is explicit
    fp32 math; ``"fused"`` uses the lse-returning fused kernel (CPU flash / CUDA efficient);
    ``"auto"`` is ``"fused"``, except that a single pattern needs no lse and goes through
    ``F.scaled_dot_product_attention``.
    """
    if backend not in ("auto", "fused", "reference"):
        raise ValueError(f"backend must be 'auto', 'fused' or 'reference', got {backend!r}")
    if q.dim() != 5 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [B, heads, H, W, d], got {q.shape}, {k.shape}")
    patterns = check_patterns(patterns, int(q.shape[1]), layout)
    kernel = "sdpa" if backend == "auto" and len(patterns) == 1 else backend
    results = [_attend_pattern(q, k, v, p, layout, kernel) for p in patterns]
    if len(results) == 1:
        return results[0][0].permute(0, 3, 1, 2, 4)
    weights = torch.softmax(torch.stack([lse for _, lse in results]), dim=0)[..., None].to(q.dtype)
    out = weights[0] * results[0][0]
    for weight, (pattern_out, _) in zip(weights[1:], results[1:], strict=True):
        out = torch.addcmul(out, weight, pattern_out)
    return out.permute(0, 3, 1, 2, 4)  # a view of token-major storage, as the projection wants


class DilatedFlashAttention(nn.Module):
    """Multi-head self-attention with dilated patterns, a drop-in for SAM's ``Attention``.

    Input and output ``[B, H, W, C]``. Parameter names (``qkv``, ``proj``) follow
    ``segment_anything/modeling/image_encoder.py``. Positions come from the encoder's absolute
    embedding; there is no relative-position bias. ``head_dim`` (default ``dim // num_heads``)
    sets the width of one head, so a head-pruned layer keeps its heads' width with fewer heads:
    ``qkv`` is then ``dim -> 3 * num_heads * head_dim`` and ``proj`` ``num_heads * head_dim -> dim``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        patterns: Sequence[Sequence[int]] = ((8, 1),),
        qkv_bias: bool = True,
        layout: Layout = "2d",
        backend: Backend = "auto",
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        if head_dim is None and dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if head_dim is not None and head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads if head_dim is None else head_dim
        self.patterns = check_patterns(patterns, num_heads, layout)
        self.layout: Layout = layout
        self.backend: Backend = backend
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).view(b, h, w, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # each [B, nh, H, W, d]
        if self.backend == "union":
            out = self._union(q, k, v, (h, w))
        else:
            out = dilated_attention(q, k, v, self.patterns, self.layout, self.backend)
        inner = self.num_heads * self.head_dim
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(b, h, w, inner))

    def union_applies(self, grid: tuple[int, int]) -> bool:
        """Whether the union form (`students.dfa_union`) covers these patterns on `grid`."""
        return union_geometry(self.patterns, grid, self.layout) is not None

    def _union(self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int]) -> Tensor:
        """The inference/export form: plain attention over gathered keys where it applies,
        else the explicit reference math (both equal the training path)."""
        if self.union_applies(grid):
            return union_attention(q, k, v, self.patterns)
        return dilated_attention(q, k, v, self.patterns, self.layout, "reference")

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, patterns={list(self.patterns)}, layout={self.layout}"
