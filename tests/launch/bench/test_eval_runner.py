"""The runner-vs-plain-loop benchmark runs and both sides compute the same mIoU."""

from __future__ import annotations

import pytest

from launch.bench import eval_runner as bench


def test_bench_eval_small() -> None:
    args = bench.parse_args(["--num-images", "2", "--min-side", "48", "--max-side", "96"])
    result = bench.bench(args)
    assert result["num_images"] == 2 and result["num_instances"] > 2
    assert result["runner_miou"] == pytest.approx(result["plain_miou"], abs=1e-3)
    # the speedup is the ratio of the two throughputs (no bound on it: the clock is shared)
    ratio = result["runner_instances_per_s"] / result["plain_instances_per_s"]
    assert result["speedup"] == pytest.approx(ratio, rel=1e-12)
    assert f"speedup {result['speedup']:.1f}x" in bench.format_result(result)
