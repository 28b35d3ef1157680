"""launch/bench/adapt.py's measurements on tiny encoders, its ratio logic, and its entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.bench.adapt import cad_choice, main, measure_config, summary_ratios, sweep_cad
from students import build_student
from teachers.build import random_vit_tiny
from tests.conftest import sam_mask_decoder_params

ENCODERS = {
    "dfa_t": lambda: build_student("dfa_t", img_size=256),
    "vit_tiny": lambda: random_vit_tiny(0).image_encoder,
}
CAD = {"width": 16, "input_size": 128}
DECODER_PARAMS = sam_mask_decoder_params()  # SAM's mask decoder, from segment_anything's builder

pytestmark = pytest.mark.slow  # child processes measuring real models


def _cad_params(width: int) -> int:
    """CAD's CNN with the 1x1 projection to 256 channels (students/adapters/cad.py)."""
    return 7 * width + 3 * (9 * width**2 + 3 * width) + 256 * width + 256


@pytest.fixture(scope="module", params=list(ENCODERS))
def rows(request: pytest.FixtureRequest) -> dict[str, dict]:
    methods = {"decoder": {}, "cad": CAD, "sam_adapter": {}, "meta": {"width": 16}}
    make = ENCODERS[request.param]
    return {m: measure_config(make(), m, kw, "cpu", repeats=0) for m, kw in methods.items()}


def test_trainable_counts(rows: dict[str, dict]) -> None:
    assert (rows["decoder"]["num_trainable"], rows["decoder"]["num_trainable_encoder"]) == (
        DECODER_PARAMS,
        0,
    )
    assert rows["cad"]["num_trainable_encoder"] == _cad_params(16) == 11_520
    for row in rows.values():
        assert row["num_trainable"] == DECODER_PARAMS + row["num_trainable_encoder"]


def test_only_in_encoder_adapters_save_inside_the_encoder(rows: dict[str, dict]) -> None:
    decoder, cad, sam_adapter = rows["decoder"], rows["cad"], rows["sam_adapter"]
    meta = rows["meta"]
    assert decoder["saved_bytes_encoder"] == cad["saved_bytes_encoder"] == 0
    assert meta["saved_bytes_encoder"] == 0 < meta["saved_bytes_branch"]  # its side network
    assert decoder["saved_bytes_branch"] == sam_adapter["saved_bytes_branch"] == 0
    assert sam_adapter["saved_bytes_encoder"] > 0 and cad["saved_bytes_branch"] > 0
    # decoder-only saves exactly what the decoder part saves in every method
    assert (
        decoder["saved_bytes"]
        == cad["saved_bytes_decoder"]
        == sam_adapter["saved_bytes_decoder"]
        == meta["saved_bytes_decoder"]
    )
    assert decoder["saved_bytes"] < sam_adapter["saved_bytes"]
    for row in rows.values():
        parts = ("encoder", "branch", "decoder")
        assert row["saved_bytes"] == sum(row[f"saved_bytes_{p}"] for p in parts)
        assert row["rss_growth_bytes"] >= 0 and row["cuda_peak_bytes"] is None
        assert row["train_step_s"] > 0 and row["latency_ratio"] > 0


def test_sweep_measures_cad_against_sam_adapter() -> None:
    sweep = sweep_cad(ENCODERS["dfa_t"], [8, 16], [64, 128], "cpu")
    points = {(p["width"], p["input_size"]): p for p in sweep["points"]}
    assert sorted(points) == [(8, 64), (8, 128), (16, 64), (16, 128)]
    # CAD's own activations grow with width and with the square of its input side
    branch = {k: p["saved_bytes_branch"] for k, p in points.items()}
    assert branch[8, 64] < branch[16, 64] < branch[16, 128]
    assert 3 < branch[8, 128] / branch[8, 64] < 4
    assert sweep["sam_adapter_saved_bytes"] > 0


def _row(encoder: str, method: str, saved: int, latency: float = 1.0) -> dict:
    return {"encoder": encoder, "method": method, "saved_bytes": saved, "latency_ratio": latency}


def test_summary_ratios_pair_methods_on_the_same_encoder() -> None:
    rows = [
        _row("a", "cad", 30),
        _row("a", "sam_adapter", 100, 1.5),
        _row("a", "decoder", 10),
        _row("b", "cad", 200, 4.0),
        _row("b", "sam_adapter", 100),
        _row("b", "lora", 80),
        _row("b", "conv_lora", 84),
    ]
    ratios = summary_ratios(rows)
    assert ratios["a"]["cad/sam_adapter"] == pytest.approx(0.3)
    assert ratios["a"]["cad/decoder"] == pytest.approx(3.0)
    assert ratios["a"]["conv_lora/lora"] is None
    assert ratios["b"]["cad/sam_adapter"] == pytest.approx(2.0)
    assert ratios["b"]["conv_lora/lora"] == pytest.approx(1.05)
    assert ratios["a"]["latency/sam_adapter"] == 1.5 and ratios["b"]["latency/cad"] == 4.0


def test_cad_choice_takes_the_largest_cad_under_the_bound() -> None:
    points = [
        {"width": w, "input_size": s, "num_trainable_branch": w * w, "saved_bytes": w * s}
        for w in (32, 64, 128)
        for s in (256, 512)
    ]
    sweep = {"sam_adapter_saved_bytes": 40_000, "points": points}
    assert (cad_choice(sweep, 1.0)["width"], cad_choice(sweep, 1.0)["input_size"]) == (128, 256)
    assert (cad_choice(sweep, 0.5)["width"], cad_choice(sweep, 0.5)["input_size"]) == (64, 256)
    assert cad_choice(sweep, 0.1) is None


def test_entry_point_writes_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    argv = ["--encoders", "dfa_t", "--img-size", "256", "--methods", "decoder", "--repeats", "0"]
    argv += ["--sweep-encoder", "dfa_t", "--cad-widths", "8", "--cad-input-sizes", "64"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"platform", "cpu_count", "torch", "date"} <= set(result["machine"])
    (row,) = result["rows"]
    assert (row["encoder"], row["method"], row["num_trainable"]) == (
        "dfa_t",
        "decoder",
        DECODER_PARAMS,
    )
    assert result["cad_sweep"]["points"][0]["width"] == 8
    printed = capsys.readouterr().out
    assert f"| dfa_t | decoder | {DECODER_PARAMS:,} / 0 |" in printed
    assert "CAD sweep on dfa_t" in printed
