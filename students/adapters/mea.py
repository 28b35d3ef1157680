"""The MEA block of META (Zhang et al., "Memory Efficient Transformer Adapter for Dense
Predictions", ICLR 2025, arXiv 2502.01962) on ``[B, H, W, C]`` tokens.

No official code exists; what is known (the abstract and the OpenReview reviews,
https://openreview.net/forum?id=vJkktqyU8B) is that an MEA block cuts inference-time *memory
access* (normalisations and reshapes, the vocabulary of EfficientViT, Liu et al. CVPR 2023) with

* one LayerNorm shared by the attention and the feed-forward branch;
* cross-shaped self-attention (CSWin, Dong et al., CVPR 2022): half of the heads attend within
  horizontal stripes of ``stripe`` rows, the other half within vertical stripes of ``stripe``
  columns, instead of window partition and reverse;
* a feed-forward branch of two 3x3 convolutions (reviewer 3) and a lightweight depth-wise
  convolution branch for local inductive bias;
* a cascaded-head variant (EfficientViT's cascaded group attention): head ``j`` reads its own
  channel split plus head ``j - 1``'s output, so heads see different features.

Choices where the paper is silent (each an argument of ``MEABlock``):

* one LayerNorm for both branches means the branches run in parallel on it:
  ``x + attn(u) + ffn(u) + local(u)``, ``u = LN(x)`` (``shared_norm=False`` gives the ViT order,
  ``x1 = x + attn(LN1(x)); x1 + ffn(LN2(x1)) + local(LN2(x1))``, for the ablation);
* the depth-wise branch reads the same ``u`` (``conv_kernel=0`` drops it);
* the FFN's hidden width is ``ffn_ratio * C`` (1.0: two 3x3 convolutions already hold ``18 C^2``
  weights, a ViT MLP of ratio 9), GELU between (``ffn_kernel=1`` makes it a plain MLP);
* a grid side that ``stripe`` does not divide is padded at the end and the padded keys masked;
* cascaded heads split the channels into ``num_heads`` parts with one ``C/h -> 3 C/h`` projection
  each, heads ``< h/2`` horizontal, the rest vertical (``cascade=True``; default off, see the
  kernel table of launch/bench/README.md for what it costs).

Layout: tokens stay ``[B, H, W, C]`` (channels last) throughout. A horizontal stripe is then a
contiguous run of ``stripe * W`` tokens, so its attention needs no copy of q, k, v; convolutions
read the tokens as a channels-last ``[B, C, H, W]`` view, again without a copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _row_stripes(qkv: Tensor, stripe: int) -> Tensor:
    """Attention within groups of ``stripe`` rows: ``[B, H, W, 3, g, d]`` -> ``[B, H, W, g, d]``.

    The stripes become the batch of one ``scaled_dot_product_attention`` call (CSWin's stripes
    as batched attention); rows padded to a multiple of ``stripe`` are masked out as keys.
    """
    b, h, w, _, g, d = qkv.shape
    pad = -h % stripe
    if pad:
        qkv = F.pad(qkv, (0, 0, 0, 0, 0, 0, 0, 0, 0, pad))
    n = (h + pad) // stripe
    q, k, v = qkv.reshape(b * n, stripe * w, 3, g, d).permute(2, 0, 3, 1, 4).unbind(0)
    mask = None
    if pad:  # [b * n, 1, 1, L]: False on the keys of padded rows (in the last stripe only)
        rows = torch.arange(n * stripe, device=qkv.device).view(n, stripe, 1) < h
        mask = rows.expand(n, stripe, w).reshape(1, n, 1, 1, stripe * w)
        mask = mask.expand(b, -1, -1, -1, -1).reshape(b * n, 1, 1, stripe * w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [b n, g, L, d]
    out = out.transpose(1, 2).reshape(b, n * stripe, w, g, d)
    return out[:, :h] if pad else out


def cross_shaped_attention(qkv: Tensor, stripe: int, split: int) -> Tensor:
    """CSWin's cross-shaped attention: ``[B, H, W, 3, heads, d]`` q, k, v -> ``[B, H, W, heads,
    d]``.

    Heads ``[:split]`` attend within horizontal stripes of ``stripe`` rows (all columns), heads
    ``[split:]`` within vertical stripes of ``stripe`` columns (all rows); scale ``d ** -0.5``.
    In the channels-last layout a horizontal stripe is a contiguous run of tokens, so only the
    vertical half is copied (once, q, k and v together).
    """
    if stripe < 1:
        raise ValueError(f"stripe width must be >= 1, got {stripe}")
    parts = []
    if split > 0:
        parts.append(_row_stripes(qkv[..., :split, :], stripe))
    if split < qkv.shape[-2]:  # vertical stripes are the horizontal ones of the transposed grid
        parts.append(_row_stripes(qkv[..., split:, :].transpose(1, 2), stripe).transpose(1, 2))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def stripe_mask(h: int, w: int, stripe: int, horizontal: bool, device=None) -> Tensor:
    """``[h w, h w]`` bool: token pairs in the same horizontal (or vertical) stripe."""
    rows, cols = torch.meshgrid(
        torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    band = (rows if horizontal else cols).flatten() // stripe
    return band[:, None] == band[None, :]


def masked_cross_attention(qkv: Tensor, stripe: int, split: int) -> Tensor:
    """Reference for ``cross_shaped_attention``: full attention over all ``H W`` tokens with a
    boolean mask per head group (same horizontal stripe for heads ``[:split]``, same vertical
    stripe for the rest). Quadratic in ``H W``: for tests."""
    b, h, w, _, heads, d = qkv.shape
    mask = torch.stack(
        [stripe_mask(h, w, stripe, i < split, qkv.device) for i in range(heads)]
    )  # [heads, HW, HW]
    q, k, v = qkv.reshape(b, h * w, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, h, w, heads, d)


class CrossShapedAttention(nn.Module):
    """``[B, H, W, C] -> [B, H, W, C]``: qkv, cross-shaped attention, output projection.

    ``cascade``: heads run one after the other, head ``j`` on channel split ``j`` plus head
    ``j - 1``'s output (EfficientViT's cascaded group attention), each with its own projection.
    ``attend`` is the attention function (``masked_cross_attention`` for the reference).
    """

    def __init__(self, dim: int, num_heads: int, stripe: int, cascade: bool = False) -> None:
        super().__init__()
        if num_heads < 2 or num_heads % 2 or dim % num_heads:
            raise ValueError(
                f"cross-shaped attention splits heads into a horizontal and a vertical half: "
                f"num_heads must be even and divide the width, got {num_heads} heads, width {dim}"
            )
        if stripe < 1:
            raise ValueError(f"stripe width must be >= 1, got {stripe}")
        self.num_heads, self.stripe, self.cascade = num_heads, stripe, cascade
        self.head_dim = dim // num_heads
        if cascade:
            self.qkvs = nn.ModuleList(
                nn.Linear(self.head_dim, 3 * self.head_dim) for _ in range(num_heads)
            )
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attend = cross_shaped_attention

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        if self.cascade:
            return self.proj(self._cascaded(x))
        qkv = self.qkv(x).view(b, h, w, 3, self.num_heads, self.head_dim)
        out = self.attend(qkv, self.stripe, self.num_heads // 2)
        return self.proj(out.reshape(b, h, w, -1))

    def _cascaded(self, x: Tensor) -> Tensor:
        outs, prev = [], None
        for j, (part, qkv) in enumerate(zip(x.chunk(self.num_heads, -1), self.qkvs, strict=True)):
            inp = part if prev is None else part + prev
            split = int(j < self.num_heads // 2)
            qkv_j = qkv(inp).unflatten(-1, (3, 1, self.head_dim))  # [B, H, W, 3, 1, d]
            prev = self.attend(qkv_j, self.stripe, split).squeeze(-2)
            outs.append(prev)
        return torch.cat(outs, dim=-1)


def _channels_first(x: Tensor) -> Tensor:
    """``[B, H, W, C]`` -> a ``[B, C, H, W]`` view in channels-last memory (no copy)."""
    return x.permute(0, 3, 1, 2)


class NHWCConv2d(nn.Conv2d):
    """``nn.Conv2d`` for channels-last inputs whose weight is stored contiguous.

    DeepSpeed flattens every trainable parameter and cannot take a strided (channels-last) one,
    so the weight keeps the default layout. Outside training (no gradient) the channels-last copy
    is made once per weight version and reused, so inference runs with no layout copy per call;
    while training, the conv kernel reorders the small weight itself.
    """

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self._inference_weight(), self.bias)

    def _inference_weight(self) -> Tensor:
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return w
        key = (w.data_ptr(), w._version, w.device)
        if getattr(self, "_nhwc_key", None) != key:
            with torch.inference_mode(False), torch.no_grad():
                self._nhwc = w.detach().contiguous(memory_format=torch.channels_last)
            self._nhwc_key = key
        return self._nhwc


class ConvFFN(nn.Module):
    """``[B, H, W, C] -> [B, H, W, C]``: ``k x k`` conv to ``hidden``, GELU, ``k x k`` conv back."""

    def __init__(self, dim: int, hidden: int, kernel: int = 3) -> None:
        super().__init__()
        if hidden < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(
                f"the FFN needs hidden width >= 1 and an odd kernel, got {hidden}, {kernel}"
            )
        self.fc1 = NHWCConv2d(dim, hidden, kernel, padding=kernel // 2)
        self.act = nn.GELU()
        self.fc2 = NHWCConv2d(hidden, dim, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(_channels_first(x)))).permute(0, 2, 3, 1)


class DepthwiseConv(nn.Module):
    """``[B, H, W, C] -> [B, H, W, C]``: the lightweight ``k x k`` depth-wise conv branch."""

    def __init__(self, dim: int, kernel: int = 3) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"the depth-wise branch needs an odd kernel, got {kernel}")
        self.conv = NHWCConv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(_channels_first(x)).permute(0, 2, 3, 1)


class MEABlock(nn.Module):
    """The memory-efficient adapter block, ``[B, H, W, C] -> [B, H, W, C]`` (module docstring)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        stripe: int = 2,
        ffn_ratio: float = 1.0,
        ffn_kernel: int = 3,
        conv_kernel: int = 3,
        cascade: bool = False,
        shared_norm: bool = True,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.norm2 = None if shared_norm else nn.LayerNorm(dim)
        self.attn = CrossShapedAttention(dim, num_heads, stripe, cascade)
        self.ffn = ConvFFN(dim, int(dim * ffn_ratio), ffn_kernel)
        self.local = DepthwiseConv(dim, conv_kernel) if conv_kernel > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        u = self.norm(x)
        if self.norm2 is not None:  # the two-norm ablation: attention first, then the rest
            x = x + self.attn(u)
            u = self.norm2(x)
            out = x + self.ffn(u)
        else:
            out = x + self.attn(u) + self.ffn(u)
        return out if self.local is None else out + self.local(u)
