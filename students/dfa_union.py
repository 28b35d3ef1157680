"""Dilated attention as plain attention over gathered keys: the inference and export form of DFA.

The merge of patterns by their softmax denominators (LongNet, arXiv 2307.02486, eq. 10) is one
softmax over the union of the keys every pattern gives a query, a key that two patterns share
counted twice:

    sum_p  exp(lse_p) / sum_p' exp(lse_p') * out_p  =  sum_(p, k in S_p) e^(s_k) v_k / sum_(p, k in S_p) e^(s_k)

So for a local pattern ``(w_l, 1)`` plus a dilated one ``(w_d, r)``, a query of head h at its
head group's offset attends once over ``[its w_l x w_l tile ; its w_d x w_d tile at that
offset]``, and every other query over its local tile alone. Tokens are regrouped by dilation
offset with strided slices, the keys of a dilated tile are broadcast to the local tiles inside it,
and every attention is a standard ``scaled_dot_product_attention`` over contiguous blocks: what
onnxruntime runs as MatMul, Softmax, MatMul with no gathers, scatters or log-sum-exp. The batch
stays a free dimension, so an exported encoder takes any batch size.

`students.dfa.dilated_attention` (the fused kernel with its exact gradient) stays the training
path; tests hold this form equal to it. Layouts as there: ``q, k, v, out [B, nh, H, W, d]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def union_geometry(
    patterns: Sequence[tuple[int, int]], grid: tuple[int, int], layout: str = "2d"
) -> tuple[tuple[int, int], tuple[int, int], int] | None:
    """(local tile, dilated tile, r) in grid tokens when this form applies, else None.

    It applies to 2-D layouts with one local pattern ``(w, 1)`` and one ``(w', r)``, where the
    tiles (clamped to the grid as `students.dfa` clamps them) divide the grid, the local tile is a
    multiple of r, and the dilated tile a multiple of the local one.
    """
    if layout != "2d" or len(patterns) != 2:
        return None
    local, dilated = sorted(patterns, key=lambda p: (p[1], p[0]))
    if local[1] != 1:
        return None
    r = dilated[1]
    tl, td = _tile(local, grid), _tile(dilated, grid)
    for g, a, b in zip(grid, tl, td, strict=True):
        if g % a or g % b or a % r or b % a:
            return None
    return tl, td, r


def _tile(pattern: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """A pattern's tile on `grid`, clamped as `students.dfa` clamps it (to the grid rounded up to
    a multiple of r: the same real tokens)."""
    w, r = pattern
    return tuple(min(w, -(-g // r) * r) for g in grid)


def _tiles(x: Tensor, tile: tuple[int, int]) -> Tensor:
    """``[B, nh, H, W, d] -> [B, nh, H/th, W/tw, th*tw, d]`` (row-major inside a tile)."""
    _, nh, h, w, d = x.shape
    th, tw = tile
    x = x.reshape(-1, nh, h // th, th, w // tw, tw, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(-1, nh, h // th, w // tw, th * tw, d)


def _untile(x: Tensor, tile: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Inverse of `_tiles`."""
    nh, d = x.shape[1], x.shape[-1]
    (th, tw), (h, w) = tile, grid
    x = x.reshape(-1, nh, h // th, w // tw, th, tw, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(-1, nh, h, w, d)


def _offsets(x: Tensor, r: int) -> list[Tensor]:
    """The ``r*r`` sub-grids ``x[..., oy::r, ox::r, :]``, offset ``g = oy * r + ox``."""
    return [x[:, :, oy::r, ox::r] for oy in range(r) for ox in range(r)]


def _own_offset(x: Tensor, r: int) -> Tensor:
    """``[B, nh, H/r, W/r, d]``: each head's tokens at its head group's offset (head group g
    of ``r*r`` holds heads ``g*nh/(r*r) ..``, as `students.dfa` assigns them)."""
    nh, groups = x.shape[1], r * r
    per = nh // groups
    subs = _offsets(x, r)
    return torch.cat([subs[g][:, g * per : (g + 1) * per] for g in range(groups)], dim=1)


def union_attention(
    q: Tensor, k: Tensor, v: Tensor, patterns: Sequence[tuple[int, int]], scale: float | None = None
) -> Tensor:
    """`students.dfa.dilated_attention` for patterns `union_geometry` accepts, as plain attention
    over gathered keys (module docstring): ``[B, nh, H, W, d] -> [B, nh, H, W, d]``."""
    nh, h, w, d = (int(n) for n in q.shape[1:])
    geometry = union_geometry(patterns, (h, w))
    if geometry is None:
        raise ValueError(f"patterns {list(patterns)} on a {h}x{w} grid have no union form")
    tl, td, r = geometry
    scale = d**-0.5 if scale is None else scale
    # Every query over its local tile.
    kl, vl = _tiles(k, tl), _tiles(v, tl)
    local = F.scaled_dot_product_attention(_tiles(q, tl), kl, vl, scale=scale)
    local = _untile(local, tl, (h, w))
    # Queries at their head's offset: local tile plus the dilated tile's keys at that offset.
    sub, stl, std = (h // r, w // r), (tl[0] // r, tl[1] // r), (td[0] // r, td[1] // r)
    q_on = _tiles(_own_offset(q, r), stl)  # [B, nh, nTy, nTx, L_on, d]
    rep = (td[0] // tl[0], td[1] // tl[1])  # local tiles per dilated tile, each axis

    def dilated_keys(x: Tensor) -> Tensor:
        x = _tiles(_own_offset(x, r), std)  # [B, nh, nDy, nDx, L_d, d]
        n_dy, n_dx, length = x.shape[2], x.shape[3], x.shape[4]
        x = x[:, :, :, None, :, None].expand(-1, -1, -1, rep[0], -1, rep[1], -1, -1)
        return x.reshape(-1, nh, n_dy * rep[0], n_dx * rep[1], length, d)

    k_on = torch.cat([kl, dilated_keys(k)], dim=-2)
    v_on = torch.cat([vl, dilated_keys(v)], dim=-2)
    on = _untile(F.scaled_dot_product_attention(q_on, k_on, v_on, scale=scale), stl, sub)
    # Each head takes `on` at its own offset and `local` at the others; then re-interleave.
    groups, per = r * r, nh // (r * r)
    own = torch.zeros(nh, groups, dtype=torch.bool)
    for g in range(groups):
        own[g * per : (g + 1) * per, g] = True
    subs = torch.stack(_offsets(local, r), dim=2)  # [B, nh, G, H/r, W/r, d]
    merged = torch.where(own[None, :, :, None, None, None].to(q.device), on[:, :, None], subs)
    merged = merged.reshape(-1, nh, r, r, *sub, d).permute(0, 1, 4, 2, 5, 3, 6)
    return merged.reshape(-1, nh, h, w, d)
