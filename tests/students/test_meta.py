"""META's MEA block and side network: cross-shaped attention against a masked full attention,
the cascaded heads, the shared LayerNorm, the taps, and the options' errors.

Identity at init, the frozen encoder's gradients and the export round trip run for meta with
every other method in ``test_adapters.py`` and ``tests/distill/test_adapt_parts.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distill.config import AdaptConfig
from students import build_student
from students.adapters import build_adapter
from students.adapters.mea import (
    CrossShapedAttention,
    MEABlock,
    cross_shaped_attention,
    masked_cross_attention,
    stripe_mask,
)
from students.adapters.meta import tap_blocks
from teachers.build import DEFAULT_TAPS, random_vit_tiny


def _qkv(h: int, w: int, heads: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, h, w, 3, heads, 8, generator=g).requires_grad_(True)


@pytest.mark.parametrize(
    "h, w, stripe, split",
    [(8, 8, 2, 2), (6, 10, 4, 2), (5, 7, 3, 1), (4, 4, 1, 4), (4, 6, 2, 0), (3, 3, 4, 2)],
)
def test_cross_shaped_attention_equals_the_masked_reference(h, w, stripe, split) -> None:
    """Forward and gradients within 1e-5, stripes that divide the grid and stripes that do not."""
    qkv = _qkv(h, w)
    fast = cross_shaped_attention(qkv, stripe, split)
    ref = masked_cross_attention(qkv, stripe, split)
    assert fast.shape == (2, h, w, 4, 8)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    grad_out = torch.randn(fast.shape, generator=torch.Generator().manual_seed(1))
    (g_fast,) = torch.autograd.grad(fast, qkv, grad_out)
    (g_ref,) = torch.autograd.grad(ref, qkv, grad_out)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=0)


def test_stripes_limit_what_a_token_sees() -> None:
    """A change of one token reaches exactly its horizontal stripe in the first head group and
    its vertical stripe in the second (so the reference's mask is the cross-shaped one)."""
    qkv = _qkv(8, 8).detach()
    base = cross_shaped_attention(qkv, 2, 2)
    moved = qkv.clone()
    moved[:, 5, 3, 1:] += 1.0  # key and value of token (5, 3)
    diff = (cross_shaped_attention(moved, 2, 2) - base).abs().amax(dim=(0, 4))  # [H, W, heads]
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.equal(diff[..., :2].amax(-1) > 0, rows // 2 == 5 // 2)
    assert torch.equal(diff[..., 2:].amax(-1) > 0, cols // 2 == 3 // 2)
    # columns {0, 1} and {2} of a 2 x 3 grid: 4 tokens (16 pairs) and 2 tokens (4 pairs)
    assert stripe_mask(2, 3, 2, horizontal=False).sum() == 20


@pytest.mark.parametrize("cascade", [False, True])
def test_attention_module_against_the_reference(cascade: bool) -> None:
    torch.manual_seed(0)
    attn = CrossShapedAttention(32, 4, stripe=3, cascade=cascade)
    x = torch.randn(2, 7, 9, 32, requires_grad=True)
    fast = attn(x)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
    attn.attend = masked_cross_attention
    ref = attn(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-4, rtol=1e-5)


def test_cascaded_heads_read_the_previous_head() -> None:
    """Head j reads channel split j and head j - 1's output only, so a change of the first split
    reaches head 0 directly and every later head through the cascade."""
    torch.manual_seed(0)
    attn = CrossShapedAttention(16, 4, stripe=2, cascade=True)
    x = torch.randn(1, 4, 4, 16)
    heads = attn._cascaded(x).unflatten(-1, (4, 4))
    moved = x.clone()
    moved[..., :4] += 1.0  # the first split
    after = attn._cascaded(moved).unflatten(-1, (4, 4))
    assert all((after[..., j, :] - heads[..., j, :]).abs().max() > 1e-4 for j in range(4))
    plain = CrossShapedAttention(16, 4, stripe=2)
    assert sum(p.numel() for p in attn.parameters()) < sum(p.numel() for p in plain.parameters())


def test_mea_block_shares_one_layer_norm() -> None:
    def norms(block: nn.Module) -> int:
        return sum(isinstance(m, nn.LayerNorm) for m in block.modules())

    shared, two = MEABlock(32), MEABlock(32, shared_norm=False)
    assert (norms(shared), norms(two)) == (1, 2)
    x = torch.randn(2, 6, 10, 32)
    assert shared(x).shape == two(x).shape == x.shape
    # weights are stored contiguous (DeepSpeed flattens them); inference reuses one channels-last
    # copy per weight version, so the convolutions run without a layout copy per call
    fc1 = shared.ffn.fc1
    assert fc1.weight.is_contiguous()
    with torch.no_grad():
        first, again = fc1._inference_weight(), fc1._inference_weight()
        assert first.is_contiguous(memory_format=torch.channels_last) and first is again
        fc1.weight.add_(1.0)
        assert torch.equal(fc1._inference_weight(), fc1.weight)  # a new version, a new copy
    assert fc1._inference_weight() is fc1.weight  # with a gradient: the parameter itself
    bare = MEABlock(32, conv_kernel=0, ffn_kernel=1)
    assert bare.local is None and bare.ffn.fc1.kernel_size == (1, 1)


def test_taps_are_the_distillers() -> None:
    assert tap_blocks(random_vit_tiny(0).image_encoder) == list(DEFAULT_TAPS["vit_tiny"])
    assert tap_blocks(build_student("dfa_t", img_size=64)) == [1, 2, 3, 5]
    assert tap_blocks(build_student("dfa_s", img_size=64)) == [1, 3, 5, 7]


def test_side_network_reads_every_tap_and_leaves_no_hook() -> None:
    torch.manual_seed(0)
    adapted = build_adapter("meta", build_student("dfa_t", img_size=128), width=16)
    with torch.no_grad():
        adapted.meta_adapter.out_proj.weight.normal_()
    x = torch.randn(1, 3, 128, 128)
    out = adapted(x)
    assert all(not b._forward_hooks for b in adapted.encoder.blocks)
    twin = copy.deepcopy(adapted)  # a copy runs on its own (no hook pointing at the original)
    torch.testing.assert_close(twin(x), out)
    # the output is the encoder's plus the side network's on the tapped blocks' outputs ...
    taps: dict[int, torch.Tensor] = {}
    with torch.no_grad(), adapted._capture(taps):
        embedding = adapted.encoder(x)
    assert sorted(taps) == adapted.taps == [1, 2, 3, 5]
    read = [taps[t] for t in adapted.taps]
    with torch.no_grad():
        side = adapted.meta_adapter(x, read)
    assert torch.equal(embedding + side, out)
    # ... and noise on any one tap, the others unchanged, changes the side network's output
    g = torch.Generator().manual_seed(1)
    for k in range(len(read)):
        moved = [t + torch.randn(t.shape, generator=g) if i == k else t for i, t in enumerate(read)]
        with torch.no_grad():
            change = (adapted.meta_adapter(x, moved) - side).abs().max().item()
        # measured 5.8 to 12.8 (|side| up to 18); a tap left unread changes nothing at all
        assert change > 0.5, f"tap {adapted.taps[k]} is not read"


def test_options_from_the_command_line_and_their_errors() -> None:
    options = "width=32,stripe=4,cascade=1"
    cfg = AdaptConfig(ckpt="b.pt", data="d", out="o", method="meta", options=options)
    adapted = build_adapter("meta", build_student("dfa_t", img_size=64), **cfg.adapter_kwargs())
    block = adapted.meta_adapter.stages[0][0]
    assert block.attn.cascade and block.attn.stripe == 4 and block.norm.normalized_shape == (32,)
    no_prior = build_adapter("meta", build_student("dfa_t", img_size=64), prior=0)
    assert no_prior.meta_adapter.prior is None
    with pytest.raises(ValueError, match="num_heads must be even"):
        build_adapter("meta", build_student("dfa_t", img_size=64), num_heads=3)
    with pytest.raises(ValueError, match="stripe width must be >= 1"):
        build_adapter("meta", build_student("dfa_t", img_size=64), stripe=0)
