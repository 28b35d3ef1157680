"""Dilated attention as plain attention over gathered keys: the inference and export form of DFA.

The merge of patterns by their softmax denominators (LongNet, arXiv 2307.02486, eq. 10) is one
softmax over the union of the keys every pattern gives a query, a key that two patterns share
counted twice:

    sum_p  exp(lse_p) / sum_p' exp(lse_p') * out_p  =  sum_(p, k in S_p) e^(s_k) v_k / sum_(p, k in S_p) e^(s_k)

So for a local pattern ``(w_l, 1)`` plus a dilated one ``(w_d, r)``, a query of head h at its
head group's offset attends once over ``[its w_l x w_l tile ; its w_d x w_d tile at that
offset]``, and every other query over its local tile alone. Tokens are regrouped by dilation
offset with strided slices and tiled with the local tiles grouped by the dilated tile holding them.
Every query attends over its local tile with a standard ``scaled_dot_product_attention``; a query
at its offset also has one softmax over the scores of its local keys concatenated with those of
its dilated tile's keys, which come from one product per dilated tile (its local tiles share
them), so no key is copied per local tile. onnxruntime runs all of it as MatMul, Concat, Softmax,
MatMul over contiguous blocks, with no gathers, scatters or log-sum-exp. The batch stays a free
dimension, so an exported encoder takes any batch size.

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


def _tiles(x: Tensor, outer: tuple[int, int], inner: tuple[int, int]) -> Tensor:
    """``[B, nh, H, W, d] -> [B, nh, H/oh, W/ow, R, ih*iw, d]``: the ``inner`` tiles grouped by the
    ``outer`` tile holding them (``R = (oh/ih)(ow/iw)``, row-major at both levels)."""
    _, nh, h, w, d = x.shape
    (oh, ow), (ih, iw) = outer, inner
    x = x.reshape(-1, nh, h // oh, oh // ih, ih, w // ow, ow // iw, iw, d)
    x = x.permute(0, 1, 2, 5, 3, 6, 4, 7, 8)
    return x.reshape(-1, nh, h // oh, w // ow, (oh // ih) * (ow // iw), ih * iw, d)


def _untile(x: Tensor, outer: tuple[int, int], inner: tuple[int, int], grid: tuple[int, int]):
    """Inverse of `_tiles`."""
    nh, d = x.shape[1], x.shape[-1]
    (oh, ow), (ih, iw), (h, w) = outer, inner, grid
    x = x.reshape(-1, nh, h // oh, w // ow, oh // ih, ow // iw, ih, iw, d)
    return x.permute(0, 1, 2, 4, 6, 3, 5, 7, 8).reshape(-1, nh, h, w, d)


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
    # Every query over its local tile (the local tiles grouped by the dilated tile holding them).
    kl, vl = _tiles(k, td, tl), _tiles(v, td, tl)  # [B, nh, nDy, nDx, R, L_l, d]
    local = F.scaled_dot_product_attention(_tiles(q, td, tl), kl, vl, scale=scale)
    local = _untile(local, td, tl, (h, w))
    # Queries at their head's offset: one softmax over the scores of their local tile's keys and
    # of their dilated tile's keys at that offset. The dilated tile's keys are shared by its R
    # local tiles, so their scores come from one product per dilated tile, with no copies of keys.
    sub, stl, std = (h // r, w // r), (tl[0] // r, tl[1] // r), (td[0] // r, td[1] // r)
    q_on = _tiles(_own_offset(q, r), std, stl) * scale  # [B, nh, nDy, nDx, R, L_on, d]
    kd, vd = (_tiles(_own_offset(x, r), std, std).squeeze(4) for x in (k, v))  # [.., L_d, d]
    rep, l_on, l_local = q_on.shape[4], q_on.shape[5], kl.shape[5]
    scores_dilated = (q_on.flatten(4, 5) @ kd.transpose(-1, -2)).unflatten(4, (rep, l_on))
    p = torch.cat([q_on @ kl.transpose(-1, -2), scores_dilated], dim=-1).softmax(dim=-1)
    on = p[..., :l_local] @ vl + (p[..., l_local:].flatten(4, 5) @ vd).unflatten(4, (rep, l_on))
    on = _untile(on, std, stl, sub)  # [B, nh, H/r, W/r, d]
    # Each head takes `on` at its own offset and `local` at the others; then re-interleave.
    groups, per = r * r, nh // (r * r)
    own = torch.zeros(nh, groups, dtype=torch.bool)
    for g in range(groups):
        own[g * per : (g + 1) * per, g] = True
    subs = torch.stack(_offsets(local, r), dim=2)  # [B, nh, G, H/r, W/r, d]
    merged = torch.where(own[None, :, :, None, None, None].to(q.device), on[:, :, None], subs)
    merged = merged.reshape(-1, nh, r, r, *sub, d).permute(0, 1, 4, 2, 5, 3, 6)
    return merged.reshape(-1, nh, h, w, d)
