"""The union form of DFA (students/dfa_union.py) equals the training path and the first-principles
reference, and what it covers is what it says."""

from __future__ import annotations

import pytest
import torch

from students import build_student
from students.dfa import DilatedFlashAttention, dilated_attention
from students.dfa_union import union_attention, union_geometry
from tests.students.test_dfa import naive_dilated_attention

CASES = [
    # (patterns, heads, grid): dfa_t/dfa_s's blocks at 1024 px and at 512 px (the wide tile
    # clamped to the grid); r = 3; two r = 1 patterns (no head groups); several heads a group.
    ([(8, 1), (32, 2)], 4, (64, 64)),
    ([(8, 1), (64, 2)], 4, (32, 32)),
    ([(3, 1), (6, 3)], 9, (12, 18)),
    ([(4, 1), (16, 1)], 2, (16, 32)),
    ([(4, 1), (8, 2)], 8, (8, 16)),
]


@pytest.mark.parametrize(("patterns", "heads", "grid"), CASES)
def test_union_equals_the_naive_reference_in_float64(patterns, heads, grid) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, heads, *grid, 8, generator=gen, dtype=torch.float64) for _ in range(3)
    )
    got = union_attention(q, k, v, patterns)
    want = naive_dilated_attention(q, k, v, patterns)
    # measured 2.0e-15 (float64 rounding): a wrong key set or weight is O(0.1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_union_equals_the_fused_training_path_in_float32() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 4, 64, 64, 32, generator=gen) for _ in range(3))
    fused = dilated_attention(q, k, v, [(8, 1), (32, 2)], backend="fused")
    # measured 1.9e-6 (float32 over 320 keys)
    torch.testing.assert_close(
        union_attention(q, k, v, [(8, 1), (32, 2)]), fused, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    ("patterns", "grid", "layout"),
    [
        ([(8, 1)], (64, 64), "2d"),  # one pattern: plain SDPA already
        ([(8, 1), (32, 2), (64, 4)], (64, 64), "2d"),  # three patterns
        ([(4, 2), (8, 2)], (16, 16), "2d"),  # no local r = 1 pattern
        ([(8, 1), (32, 2)], (60, 64), "2d"),  # tiles do not divide the grid
        ([(6, 1), (32, 2)], (64, 64), "2d"),  # local tile not a multiple of r
        ([(8, 1), (32, 2)], (64, 64), "1d"),
    ],
)
def test_union_geometry_refuses_what_it_does_not_cover(patterns, grid, layout) -> None:
    assert union_geometry(patterns, grid, layout) is None


def test_module_union_backend_equals_auto_and_falls_back_where_not_covered() -> None:
    torch.manual_seed(0)
    attn = DilatedFlashAttention(64, 4, [(4, 1), (8, 2)])
    x = torch.randn(2, 16, 16, 64)
    odd = torch.randn(2, 12, 10, 64)  # 8-tiles do not divide 12 x 10: the reference math
    with torch.inference_mode():
        want, want_odd = attn(x), attn(odd)
        attn.backend = "union"
        assert attn.union_applies((16, 16)) and not attn.union_applies((12, 10))
        torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(attn(odd), want_odd, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["dfa_t", "dfa_s"])
def test_registered_students_are_covered_at_1024_and_512(name) -> None:
    for side in (1024, 512):
        encoder = build_student(name, img_size=side)
        grid = (side // 16, side // 16)
        layers = [m for m in encoder.modules() if isinstance(m, DilatedFlashAttention)]
        assert layers and all(m.union_applies(grid) for m in layers)
