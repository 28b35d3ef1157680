"""Student encoders over the whole registry: shapes, taps, gradients, registry and bad args."""

from __future__ import annotations

import pytest
import torch

from students import DFAEncoder, build_student, list_students
from students.encoder import DFABlock, MLPOnlyBlock


def _image(batch: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_registry_names() -> None:
    assert list_students() == ["dfa_b", "dfa_s", "dfa_t"]


@pytest.mark.parametrize("name", list_students())
@pytest.mark.parametrize("side", [128, 256])
def test_shapes_taps_and_gradients(name: str, side: int) -> None:
    torch.manual_seed(0)
    model = build_student(name, img_size=side)
    depth, width = len(model.blocks), model.embed_dim
    emb, taps = model.forward_features(_image(2, side), taps=[0, depth // 2, -1])
    assert emb.shape == (2, 256, side // 16, side // 16)
    assert sorted(taps) == [0, depth // 2, depth - 1]
    for tap in taps.values():
        assert tap.shape == (2, side // 16, side // 16, width)
    assert torch.isfinite(emb).all()
    (emb.square().mean() + sum(t.square().mean() for t in taps.values())).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", list_students())
def test_default_grid_forward_matches_taps_path(name: str) -> None:
    model = build_student(name, img_size=128).eval()
    x = _image(1, 128, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x, taps=[1])[0])


def test_position_embedding_interpolates_to_other_sizes() -> None:
    model = build_student("dfa_t", img_size=256)
    assert model.img_size == 256 and model.pos_embed.shape == (1, 16, 16, model.embed_dim)
    assert model._pos_embed(16, 16) is model.pos_embed
    assert model._pos_embed(8, 12).shape == (1, 8, 12, model.embed_dim)
    with torch.no_grad():
        assert model(_image(1, 128)).shape == (1, 256, 8, 8)
        assert model(torch.randn(1, 3, 160, 96)).shape == (1, 256, 10, 6)


def test_block_types_follow_the_builder() -> None:
    model = build_student("dfa_s", img_size=128)
    kinds = [type(b) for b in model.blocks]
    assert kinds[:2] == [MLPOnlyBlock, MLPOnlyBlock]
    assert all(k is DFABlock for k in kinds[2:])
    assert model.blocks[-1].attn.patterns[-1] == (64, 2)


def test_fused_and_reference_backends_agree() -> None:
    torch.manual_seed(0)
    fused = build_student("dfa_t", img_size=128, backend="fused")
    reference = build_student("dfa_t", img_size=128, backend="reference")
    reference.load_state_dict(fused.state_dict())
    x = _image(2, 128, seed=2)
    outs = []
    for model in (fused, reference):
        emb = model(x)
        emb.square().mean().backward()
        outs.append((emb.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=0)
    for g_fused, g_ref in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(g_fused, g_ref, atol=1e-5, rtol=1e-4)


def test_build_records_plain_kwargs_and_rebuilds() -> None:
    model = build_student("dfa_t", img_size=128, patterns=((4, 1), (8, 2)), layout="1d")
    assert model.student_name == "dfa_t"
    assert model.student_kwargs == {"img_size": 128, "patterns": [[4, 1], [8, 2]], "layout": "1d"}
    again = build_student(model.student_name, **model.student_kwargs)
    again.load_state_dict(model.state_dict())
    assert all(b.attn.patterns == ((4, 1), (8, 2)) for b in again.blocks[2:])
    assert build_student().student_name == "dfa_s"


def test_unknown_name_and_non_plain_kwargs_raise() -> None:
    with pytest.raises(ValueError, match="dfa_b, dfa_s, dfa_t"):
        build_student("vit_h")
    with pytest.raises(ValueError, match="img_size"):
        build_student("dfa_t", img_size=torch.tensor(128))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(img_size=200), "multiple of patch_size"),
        (dict(embed_dim=90), "not divisible"),
        (dict(depth=0), "depth must be"),
        (dict(mlp_only_blocks=[9]), "out of range"),
        (dict(block_patterns=[[[8, 1]]]), "one per block"),
        (dict(num_heads=2, patterns=[[8, 1], [32, 2]]), "head groups"),
        (dict(patterns=[[32, 2]]), "dilation 1"),
        (dict(layout="3d"), "layout"),
        (dict(backend="xformers"), "backend"),
    ],
)
def test_bad_constructor_args_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DFAEncoder(**{"embed_dim": 64, "depth": 3, "num_heads": 4, **kwargs})


def test_bad_inputs_raise() -> None:
    model = build_student("dfa_t", img_size=128)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.randn(1, 3, 120, 128))
    with pytest.raises(ValueError, match="taps"):
        model.forward_features(_image(1, 128), taps=[len(model.blocks)])


def _plain_attention(attn, x: torch.Tensor, window: int | None) -> torch.Tensor:
    """Multi-head attention of `attn`'s weights over the whole grid, or inside square windows."""
    b, h, w, c = x.shape
    q, k, v = attn.qkv(x).view(b, h, w, 3, attn.num_heads, attn.head_dim).unbind(3)
    if window is None:
        window = h
    tiles = [
        (slice(i, i + window), slice(j, j + window))
        for i in range(0, h, window)
        for j in range(0, w, window)
    ]
    out = torch.zeros_like(q)
    for rows, cols in tiles:
        qt, kt, vt = (t[:, rows, cols].flatten(1, 2).transpose(1, 2) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
        out[:, rows, cols] = o.transpose(1, 2).reshape(b, window, window, *q.shape[-2:])
    return attn.proj(out.flatten(3))


@pytest.mark.parametrize(("tile", "window"), [(8, 8), (64, None)])
def test_tile_option_is_windowed_or_global_attention_in_every_block(tile, window) -> None:
    torch.manual_seed(0)
    model = build_student("dfa_t", img_size=256, tile=tile)
    assert model.student_kwargs == {"img_size": 256, "tile": tile}
    attns = [b.attn for b in model.blocks if isinstance(b, DFABlock)]
    assert len(attns) == 4 and all(a.patterns == ((tile, 1),) for a in attns)
    x = torch.randn(2, 16, 16, model.embed_dim)
    with torch.no_grad():
        got, want = attns[0](x), _plain_attention(attns[0], x, window)
    assert (got - want).abs().max() < 1e-5
    with pytest.raises(ValueError, match="dilation needs tile"):
        build_student("dfa_t", dilation=2)


def _attention_flops(model: DFAEncoder, side: int, device: str = "meta") -> tuple[int, set[str]]:
    """FLOPs of attention proper (QK^T and AV, not the qkv/proj linears) of one forward at
    ``side`` px, and the ops that carried them, counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, side, side, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    linear_ops = {"aten.convolution", "aten.addmm", "aten.mm"}
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = {op: n for op, n in counts.items() if op not in linear_ops}
    return sum(attention.values()), set(attention)


def _pattern_flops(model: DFAEncoder, side: int) -> int:
    """Attention FLOPs by the pattern arithmetic, for square grids that r divides.

    A (w, r) pattern on a g x g grid cuts tiles of t = min(w, g); a head keeps the g^2 / r^2
    queries at its offset, each attending the t^2 / r^2 keys at that offset in its tile, so
    QK^T and AV cost 2 * 2 * d * (g^2 / r^2) * (t^2 / r^2) a head, 4 * C * N * t^2 / r^4 a
    layer (C = heads * d, N = g^2 tokens).
    """
    g = side // model.patch_size
    total = 0
    for block in model.blocks:
        if isinstance(block, DFABlock):
            width = block.attn.num_heads * block.attn.head_dim
            total += sum(4 * width * g**2 * min(w, g) ** 2 // r**4 for w, r in block.attn.patterns)
    return total


def test_dfa_attention_flops_grow_linearly_and_global_quadratically() -> None:
    """DFA's near-linear cost, counted in FLOPs rather than timed (a shared machine's clock
    says little). Meta tensors make 2048 px free to count; a real CPU run at 256 px goes
    through the fused flash kernel and must count the same."""
    sides = (256, 512, 1024, 2048)
    with torch.device("meta"):
        dfa = build_student("dfa_t", img_size=1024)
        dense = build_student("dfa_t", img_size=1024, tile=128)  # global up to a 128 x 128 grid
    tokens = {s: (s // 16) ** 2 for s in sides}
    flops = {s: _attention_flops(dfa, s)[0] for s in sides}
    dense_flops = {s: _attention_flops(dense, s)[0] for s in sides}
    for side in sides:  # the counter sees exactly the arithmetic: dilation and tiling do act
        assert flops[side] == _pattern_flops(dfa, side)
        assert dense_flops[side] == _pattern_flops(dense, side)
    # Per token, DFA costs 4 * C * sum(t^2 / r^4), bounded by the cap with t = w that every
    # tile reaches once the grid holds it (64 x 64 at 1024 px for dfa_t's (64, 2) pattern):
    # 704 * 4C a token against 320 * 4C at 256 px, so at most 2.2x across 64x the tokens,
    # and exactly linear from 1024 px on.
    cap = sum(
        4 * b.attn.num_heads * b.attn.head_dim * w**2 // r**4
        for b in dfa.blocks
        if isinstance(b, DFABlock)
        for w, r in b.attn.patterns
    )
    per_token = {s: flops[s] / tokens[s] for s in sides}
    assert all(per_token[s] <= cap for s in sides)
    assert per_token[1024] == per_token[2048] == cap
    assert per_token[2048] / per_token[256] == pytest.approx(2.2)
    # Global attention costs 4 * C * N a token: 4x the tokens, 16x the FLOPs, every step.
    for small, large in zip(sides, sides[1:]):
        assert dense_flops[large] == 16 * dense_flops[small]
    assert dense_flops[2048] / dense_flops[256] == 4096
    real, ops = _attention_flops(build_student("dfa_t", img_size=256), 256, device="cpu")
    assert ops == {"aten._scaled_dot_product_flash_attention_for_cpu"}
    assert real == flops[256]
