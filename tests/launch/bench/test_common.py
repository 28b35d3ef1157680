"""The benchmark wing's shared helper (`launch/bench/common/`): interleaved timing, the results
JSON, and a function run in a child process."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from launch.bench.common import ChildFailed, interleaved, paired, run_child, write_results
from tests.conftest import REPO


def test_interleaved_times_the_calls_in_turns_after_the_warm_up():
    order: list[str] = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    found = interleaved(calls, repeats=2, warmup=1)
    assert order == ["a", "b"] * 3
    assert set(found) == {"a", "b"} and all(s >= 0 for s in found.values())


@dataclass
class _Config:
    repeats: int = 3
    """Repeats."""


def test_the_results_json_records_figures_command_config_machine_and_date(tmp_path, capsys):
    script = str(REPO / "launch" / "bench" / "speed.py")
    path = write_results(
        tmp_path / "r.json", {"rows": [1]}, _Config(), script=script, argv=["--repeats", "3"]
    )
    record = json.loads(path.read_text())
    assert record["command"] == "python launch/bench/speed.py --repeats 3"
    assert record["config"] == {"repeats": 3} and record["rows"] == [1]
    assert {"platform", "cpu_count", "torch", "date"} <= set(record["machine"])
    assert record["date"] == record["machine"]["date"]
    assert f"wrote {path}" in capsys.readouterr().out


def test_a_child_process_runs_a_function_and_names_its_error():
    assert run_child("launch.bench.common:machine_info", device="cpu")["device"] == "cpu"
    with pytest.raises(ChildFailed) as failed:
        run_child("launch.bench.common:build_encoder", name="nope", image_size=64, device="cpu")
    assert "unknown model 'nope'" in failed.value.last_line


def test_paired_differences_mean_standard_error_and_share_improved():
    base = {1: 50.0, 2: 60.0, 3: 70.0, 4: 80.0}
    new = {1: 52.0, 2: 59.0, 3: 74.0, 4: 81.0}  # differences 2, -1, 4, 1
    d = paired(base, new)
    assert d["n"] == 4 and d["mean"] == pytest.approx(1.5)
    # sample sd of (2, -1, 4, 1) is sqrt(13 / 3); se = sd / 2
    assert d["se"] == pytest.approx((13 / 3) ** 0.5 / 2)
    assert d["improved"] == 0.75
