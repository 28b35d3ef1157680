"""launch/bench/gpu_check.py on the CPU (--device cpu --quick): every stage runs, tiny, and its
results JSON says what ran, with the kernels' errors inside their stated bounds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, unplaced_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    cmd = [sys.executable, "launch/bench/gpu_check.py", "--device", "cpu", "--quick"]
    cmd += ["--out", str(out), "--models", "dfa_t", "--timeout", "400"]
    env = unplaced_env(GPU_CHECK_PORT="29675")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), done.stdout


def test_every_stage_ran_and_the_json_says_where(results):
    record, stdout = results
    stages = record["stages"]
    assert list(stages) == ["kernels", "pipeline", "speed"]
    for name in ("cache", "distill", "phase2", "adapt_cad", "adapt_conv_lora", "eval"):
        assert stages["pipeline"][name]["ran"], stages["pipeline"][name]
    assert record["machine"]["device"] == "cpu" and record["command"].startswith("python launch")
    assert "FAILED" not in stdout


def test_kernel_errors_are_within_their_bounds(results):
    kernels = results[0]["stages"]["kernels"]
    for name in ("fp32", "bf16", "dfa_fp32"):  # the CPU flash kernel has fp32 and bf16
        row = kernels[name]
        errors = [v for k, v in row.items() if k.startswith(("out", "lse", "grad", "dfa"))]
        assert row["ran"] and row["ok"] and errors and max(errors) <= row["bound"], row


def test_the_eval_and_speed_rows_carry_figures(results):
    stages = results[0]["stages"]
    ev = stages["pipeline"]["eval"]
    assert 0 <= ev["student_miou"] <= 100 and ev["teacher_miou"] > ev["box_fill_miou"] > 0
    row = stages["speed"]["dfa_t"]
    assert row["ran"] and row["latency_ms_fp32"] > 0 and row["images_per_s_bf16"] > 0
    assert "no torch.compile" in row["note"]
