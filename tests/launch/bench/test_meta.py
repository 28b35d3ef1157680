"""launch/bench/meta.py on tiny blocks: parameter matching, the profiler's kernel counts (which do
not depend on the machine), and the entry point. Latency is printed, never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from segment_anything.modeling.image_encoder import Block

from launch.bench.meta import build_blocks, main, matched_mlp_dim, num_params, profile_counts
from students.adapters.mea import MEABlock

WIDTH, HEADS, GRID = 32, 4, 16


@pytest.mark.parametrize("mlp", [1, 37, 128])
def test_matched_mlp_dim_inverts_the_vit_block_size(mlp: int) -> None:
    vit = Block(WIDTH, HEADS, mlp_ratio=(mlp + 0.5) / WIDTH, window_size=7)
    assert vit.mlp.lin1.out_features == mlp
    assert matched_mlp_dim(num_params(vit), WIDTH) == mlp


def test_blocks_have_the_same_width_and_parameters() -> None:
    blocks = build_blocks(WIDTH, HEADS, stripe=2, window=7)
    mea = num_params(blocks["mea"])
    assert num_params(blocks["vit"]) == num_params(blocks["vit_sdpa"])
    assert abs(num_params(blocks["vit"]) - mea) <= WIDTH  # one MLP unit is 2 C + 1 parameters
    x = torch.randn(1, GRID, GRID, WIDTH)
    with torch.inference_mode():
        vit, sdpa = blocks["vit"].eval(), blocks["vit_sdpa"].eval()
        sdpa.load_state_dict(vit.state_dict())
        torch.testing.assert_close(sdpa(x), vit(x), atol=1e-5, rtol=1e-5)  # only the kernel
        assert all(b.eval()(x).shape == x.shape for b in blocks.values())


def test_profiler_counts_normalisation_and_copy_kernels() -> None:
    torch.manual_seed(0)
    blocks = build_blocks(WIDTH, HEADS, stripe=2, window=7)  # 16 is padded to 21 for windows
    x = torch.randn(2, GRID, GRID, WIDTH)
    counts = {name: profile_counts(block.eval(), x) for name, block in blocks.items()}
    assert [counts[n]["norm_kernels"] for n in ("vit", "vit_sdpa", "mea", "mea_two_norms")] == [
        2,
        2,
        1,
        2,
    ]
    # MEA: one copy of the vertical half's q, k, v and the concatenation of the two head groups;
    # the ViT block pads, partitions, reshapes q, k, v, reverses and crops
    assert counts["mea"]["copy_kernels"] == 2
    assert counts["mea"]["copy_kernels"] < counts["vit_sdpa"]["copy_kernels"]
    assert counts["vit_sdpa"]["copy_kernels"] < counts["vit"]["copy_kernels"]
    tokens = 2 * GRID * GRID * 4  # bytes of one channel of every token, fp32
    assert counts["mea"]["copy_bytes"] == tokens * (3 * WIDTH // 2 + WIDTH)
    assert counts["mea"]["copy_bytes"] < counts["vit_sdpa"]["copy_bytes"]
    assert counts["mea_cascade"]["copy_kernels"] == 3  # one per vertical head, and the cat
    assert all(0 <= c["norm_ms"] + c["copy_ms"] <= c["profiled_ms"] for c in counts.values())
    assert profile_counts(MEABlock(WIDTH, conv_kernel=0).eval(), x)["copy_kernels"] == 2


def test_entry_point_writes_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench_meta.json"
    argv = ["--width", "32", "--grid", "16", "--window", "7", "--batches", "1,2"]
    assert main([*argv, "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"platform", "cpu_count", "torch", "date"} <= set(result["machine"])
    assert [(r["block"], r["batch"]) for r in result["rows"]][:2] == [("vit", 1), ("vit_sdpa", 1)]
    assert len(result["rows"]) == 10 and all(r["latency_ms"] > 0 for r in result["rows"])
    assert len(result["verdict"]) == 2
    printed = capsys.readouterr().out
    assert "| `mea` | 2 |" in printed and "the paper's direction" in printed


def test_bad_flags_are_named() -> None:
    with pytest.raises(SystemExit):
        main(["--heads", "3"])
    with pytest.raises(SystemExit):
        main(["--batches", "one"])
