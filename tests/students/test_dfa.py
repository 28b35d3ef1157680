"""Dilated Flash Attention against independent references: global, windowed and explicit masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import window_partition, window_unpartition

from students.dfa import DilatedFlashAttention, check_patterns, dilated_attention
from students.fused import attention_with_lse, reference_attention

BACKENDS = ["auto", "fused", "reference"]
ATOL = 1e-5


def _qkv(b: int, heads: int, h: int, w: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, h, w, d, generator=gen).requires_grad_() for _ in range(3)]


def _value_and_grads(fn, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, tuple]:
    """Output and the gradients of ``<output, fixed random cotangent>`` w.r.t. ``tensors``."""
    out = fn(*tensors)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(123))
    grads = torch.autograd.grad((out * cotangent.to(out.dtype)).sum(), tensors)
    return out.float().detach(), tuple(g.float() for g in grads)


def _assert_close(got, want, atol: float = ATOL, rtol: float = 0.0) -> None:
    (out, grads), (ref_out, ref_grads) = got, want
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol)


def _flat(x: torch.Tensor) -> torch.Tensor:  # [B, nh, H, W, d] -> [B, nh, H*W, d]
    return x.flatten(2, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["2d", "1d"])
def test_whole_grid_r1_is_global_attention(backend: str, layout: str) -> None:
    q, k, v = _qkv(2, 4, 6, 7, 16)
    segment = 64 if layout == "2d" else 6 * 7

    def dfa(q, k, v):
        return dilated_attention(q, k, v, [(segment, 1)], layout, backend)

    def dense(q, k, v):
        return F.scaled_dot_product_attention(_flat(q), _flat(k), _flat(v)).view(q.shape)

    _assert_close(_value_and_grads(dfa, [q, k, v]), _value_and_grads(dense, [q, k, v]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_r1_is_windowed_attention(backend: str) -> None:
    b, heads, h, w, d, win = 2, 4, 8, 12, 16, 4
    q, k, v = _qkv(b, heads, h, w, d, seed=1)

    def windowed(q, k, v):
        # SAM's own window helpers (segment_anything/modeling/image_encoder.py), heads in C.
        parts = []
        for x in (q, k, v):
            x = x.permute(0, 2, 3, 1, 4).reshape(b, h, w, heads * d)
            x, _ = window_partition(x, win)  # [B * num_windows, win, win, heads * d]
            parts.append(x.reshape(-1, win * win, heads, d).transpose(1, 2))
        out = F.scaled_dot_product_attention(*parts).transpose(1, 2)
        out = window_unpartition(out.reshape(-1, win, win, heads * d), win, (h, w), (h, w))
        return out.view(b, h, w, heads, d).permute(0, 3, 1, 2, 4)

    def dfa(q, k, v):
        return dilated_attention(q, k, v, [(win, 1)], "2d", backend)

    _assert_close(_value_and_grads(dfa, [q, k, v]), _value_and_grads(windowed, [q, k, v]))


def naive_dilated_attention(q, k, v, patterns, layout: str = "2d") -> torch.Tensor:
    """From first principles, in float64: one boolean [heads, N, N] mask per pattern.

    Query i may see key j under head h iff both lie in the same w-segment (tiles of the
    unpadded grid, in 2-D; runs of the flat sequence, in 1-D) and both sit at head h's dilation
    offset. Patterns are mixed with softmax over their lse, -inf where a head skips a token.
    """
    b, heads, h, w, d = q.shape
    ys, xs = (t.flatten() for t in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
    idx = torch.arange(h * w)
    qf, kf, vf = (t.reshape(b, heads, h * w, d).double() for t in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(d)
    outs, lses = [], []
    for seg, r in patterns:
        masks = []
        for head in range(heads):
            group = head // (heads // (r * r if layout == "2d" else r))
            if layout == "2d":
                at_offset = (ys % r == group // r) & (xs % r == group % r)
                same = (ys[:, None] // seg == ys[None] // seg) & (
                    xs[:, None] // seg == xs[None] // seg
                )
            else:
                at_offset = idx % r == group
                same = idx[:, None] // seg == idx[None] // seg
            masks.append(same & at_offset[:, None] & at_offset[None])
        masked = scores.masked_fill(~torch.stack(masks), float("-inf"))
        lse = torch.logsumexp(masked, dim=-1)  # -inf on rows the head does not cover
        probs = torch.exp(masked - lse[..., None]).nan_to_num(0.0)
        outs.append(probs @ vf)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses), dim=0)
    out = sum(wt[..., None] * o for wt, o in zip(weights, outs, strict=True))
    return out.reshape(b, heads, h, w, d)


MULTI_CASES = [
    # (layout, patterns, heads, grid): divisible; not divisible (padding must get no weight, and
    # the naive reference has no padding at all); (10, 9) with r = 4 has dilated segments that
    # hold only padding (no NaN may leak into gradients); r = 3; a tile clamped to the grid; 1-D.
    ("2d", [(4, 1), (8, 2)], 4, (8, 8)),
    ("2d", [(4, 1), (8, 2)], 8, (10, 11)),
    ("2d", [(2, 1), (4, 2), (8, 4)], 16, (10, 9)),
    ("2d", [(3, 1), (6, 3)], 9, (7, 8)),
    ("2d", [(4, 2), (4, 1), (64, 2)], 4, (6, 5)),
    ("1d", [(8, 1), (16, 4)], 4, (5, 7)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("layout", "patterns", "heads", "grid"), MULTI_CASES)
def test_patterns_match_naive_mask_reference(backend, layout, patterns, heads, grid) -> None:
    q, k, v = _qkv(2, heads, *grid, 8, seed=2)

    def dfa(q, k, v):
        return dilated_attention(q, k, v, patterns, layout, backend)

    def naive(q, k, v):
        return naive_dilated_attention(q, k, v, patterns, layout)

    _assert_close(_value_and_grads(dfa, [q, k, v]), _value_and_grads(naive, [q, k, v]))


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_lse_gradient_is_exact(with_bias: bool) -> None:
    """The lse of the fused kernel carries the true gradient (students/fused.py's column trick)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 2, 9, 16, generator=gen).requires_grad_() for _ in range(3))
    bias = None
    if with_bias:
        bias = torch.zeros(3, 1, 1, 9)
        bias[..., -4:] = torch.finfo(torch.float32).min / 2
    g_out, g_lse = torch.randn(3, 2, 9, 16, generator=gen), torch.randn(3, 2, 9, generator=gen)
    results = []
    for fn in (attention_with_lse, reference_attention):
        out, lse = fn(q, k, v, bias, 0.25)
        grads = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
        results.append((torch.cat([out, lse[..., None]], -1).detach(), grads))
    _assert_close(results[0], results[1])


def test_module_fused_matches_reference() -> None:
    torch.manual_seed(5)
    fused = DilatedFlashAttention(32, 4, [(4, 1), (8, 2)], backend="fused")
    reference = DilatedFlashAttention(32, 4, [(4, 1), (8, 2)], backend="reference")
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 9, 10, 32)
    outs = []
    for module in (fused, reference):
        out = module(x)
        out.square().sum().backward()
        outs.append((out.detach(), tuple(p.grad for p in module.parameters())))
    assert outs[0][0].shape == (2, 9, 10, 32)
    # Parameter gradients sum over every token (magnitudes near 100): float32 summation order
    # differs between the two backends by a few ulps of that, so relative as well as absolute.
    _assert_close(outs[0], outs[1], rtol=1e-6)


@pytest.mark.parametrize("with_bias", [False, True])
def test_cuda_branch_signatures_on_meta_tensors(with_bias: bool) -> None:
    """Meta tensors take the non-CPU branch: the CUDA kernels' calls and shapes are checked here,
    their numbers only on a GPU (next test)."""
    from students.fused import _FusedAttentionWithLse

    q, k, v = (torch.empty(6, 2, 50, 16, device="meta", requires_grad=True) for _ in range(3))
    bias = torch.zeros(6, 1, 1, 50, device="meta") if with_bias else None
    out, lse = _FusedAttentionWithLse.apply(q, k, v, bias, 0.25)
    assert out.shape == (6, 2, 50, 16) and lse.shape == (6, 2, 50)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    assert all(g.shape == (6, 2, 50, 16) for g in grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels: run on a GPU machine")
@pytest.mark.parametrize("grid", [(8, 8), (10, 11)])
def test_cuda_fused_matches_reference(grid: tuple[int, int]) -> None:
    q, k, v = (t.detach().cuda().requires_grad_() for t in _qkv(2, 4, *grid, 16, seed=6))
    patterns = [(4, 1), (8, 2)]
    got = _value_and_grads(lambda *t: dilated_attention(*t, patterns, backend="fused"), [q, k, v])
    want = _value_and_grads(lambda *t: naive_dilated_attention(*t, patterns), [q, k, v])
    _assert_close(got, want, atol=1e-4)


@pytest.mark.parametrize(
    ("patterns", "heads", "layout", "message"),
    [
        ([(8, 2)], 4, "2d", "without attention"),
        ([(8, 1), (8, 2)], 6, "2d", "not a multiple of 4"),
        ([(8, 1), (18, 3)], 4, "1d", "not a multiple of 3"),
        ([(6, 4)], 16, "2d", "w a multiple of r"),
        ([], 4, "2d", "empty"),
        ([(8, 1, 1)], 4, "2d", "pair"),
        ([(8, 1)], 4, "3d", "layout"),
    ],
)
def test_bad_patterns_raise(patterns, heads, layout, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_patterns(patterns, heads, layout)


def test_bad_module_args_raise() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        DilatedFlashAttention(30, 4)
    with pytest.raises(ValueError, match="backend"):
        DilatedFlashAttention(32, 4, backend="triton")
    q, k, v = _qkv(1, 4, 4, 4, 8)
    with pytest.raises(ValueError, match=r"\[B, heads, H, W, d\]"):
        dilated_attention(q[0], k[0], v[0], [(4, 1)])
