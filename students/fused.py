"""Attention that also returns the softmax log-sum-exp (lse), with an exact gradient through it.

LongNet's pattern mixing (arXiv 2307.02486, section 2.2) needs each pattern's lse, which the
fused kernels compute anyway: on CPU ``aten._scaled_dot_product_flash_attention_for_cpu``, on CUDA
``aten._scaled_dot_product_efficient_attention`` (it takes an additive bias, which the padding
mask needs, and runs fp32 as well as fp16/bf16). Autograd treats their lse as non-differentiable,
and torchscale's ``component/dilated_attention.py`` therefore computes its mixing weights under
``no_grad``. We keep the exact gradient with one observation about FlashAttention-style backward
kernels: they recompute ``P = exp(S - lse)`` and use ``out`` only through ``D_i = sum(dO_i * O_i)``
in ``dS = P * (dO V^T - D)``. An upstream gradient ``g`` on ``lse_i = logsumexp_j S_ij`` adds
``P_ij * g_i`` to ``dS_ij``, i.e. it replaces ``D_i`` by ``D_i - g_i``. Appending one column to
``dO`` (ones) and to ``O`` (``-g``), zero columns to ``q, k, v``, and passing the scale
explicitly makes the stock backward kernel return exactly that, in one call. Tested against the
explicit reference on CPU (tests/students/test_dfa.py); the CUDA branch is checked for shapes on
meta tensors everywhere and for values only where a GPU is present.

Layouts: ``q, k, v, out`` are ``[N, heads, L, d]``, ``lse`` is ``[N, heads, L]`` (fp32), ``bias``
is additive and broadcastable to ``[N, heads, L, L]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_ATEN = torch.ops.aten


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Plain attention with an explicit fp32 softmax; returns ``(out, lse)``, both differentiable."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float())
    return out.to(q.dtype), lse


def fused_available(device: torch.device) -> bool:
    """True where ``attention_with_lse`` has a fused kernel (CPU and CUDA)."""
    return device.type in ("cpu", "cuda")


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Fused attention returning ``(out [N, h, L, d], lse [N, h, L] fp32)``, exact gradients."""
    if not fused_available(q.device):
        return reference_attention(q, k, v, bias, scale)
    return _FusedAttentionWithLse.apply(q, k, v, bias, scale)


def _forward_kernel(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float):
    """Returns ``(out, lse, lse_for_backward, extras)`` from the device's fused kernel."""
    length = q.shape[-2]
    if q.device.type == "cpu":
        out, lse = _ATEN._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
        return out, lse, lse, ()
    # CUDA, written for clusters and not run on the CPU-only dev machines: the lse of the
    # efficient kernel may be padded along L (to a multiple of 32 in some versions).
    out, lse, seed, offset = _ATEN._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, False, scale=scale
    )
    return out, lse[..., :length], lse, (seed, offset)


def _backward_kernel(ctx, grad_out: Tensor, grad_lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, bias, out, lse = ctx.saved_tensors
    d = q.shape[-1]
    # One extra column on CPU; eight on CUDA keep the head size a multiple of 8 (kernel alignment).
    extra = 1 if q.device.type == "cpu" else 8
    shape = (*grad_out.shape[:-1], extra)
    ones = torch.zeros(shape, dtype=grad_out.dtype, device=grad_out.device)
    ones[..., 0] = 1.0
    minus_g = torch.zeros(shape, dtype=out.dtype, device=out.device)
    minus_g[..., 0] = -grad_lse
    grad_out_x = torch.cat([grad_out, ones], dim=-1)
    out_x = torch.cat([out, minus_g], dim=-1)
    qx, kx, vx = (F.pad(t, (0, extra)) for t in (q, k, v))
    if q.device.type == "cpu":
        dq, dk, dv = _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out_x, qx, kx, vx, out_x, lse, 0.0, False, attn_mask=bias, scale=ctx.scale
        )
    else:
        seed, offset = ctx.extras
        dq, dk, dv, _ = _ATEN._scaled_dot_product_efficient_attention_backward(
            grad_out_x, qx, kx, vx, bias, out_x, lse, seed, offset, 0.0,
            [True, True, True, False], False, scale=ctx.scale,
        )  # fmt: skip
    return dq[..., :d], dk[..., :d], dv[..., :d]


class _FusedAttentionWithLse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if bias is not None and q.device.type == "cuda":
            bias = _aligned_bias(bias, q)
        out, lse, lse_raw, extras = _forward_kernel(q, k, v, bias, scale)
        ctx.save_for_backward(q, k, v, bias, out, lse_raw)
        ctx.scale, ctx.extras = scale, extras
        return out, lse

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_lse: Tensor):
        dq, dk, dv = _backward_kernel(ctx, grad_out.contiguous(), grad_lse.contiguous())
        return dq, dk, dv, None, None


def _aligned_bias(bias: Tensor, q: Tensor) -> Tensor:
    # The CUDA efficient kernel wants a dense [N, h, L, L] bias whose row stride is a multiple
    # of 16 elements; torch's own SDPA dispatcher pads it the same way (sdp_utils ``pad_bias``).
    n, h, length, _ = q.shape
    bias = bias.to(q.dtype).expand(n, h, length, length)
    pad = -length % 16
    return F.pad(bias, (0, pad))[..., :length] if pad else bias.contiguous()
