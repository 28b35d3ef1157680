"""A pruned student re-distilled from the same cache (launch/distill.py --init) starts from the
pruned weights and wins back the feature loss that pruning cost, on the distillation loss the
training logs (log.csv, every step).

Measured over seeds 0-4 (`--seed` of both runs, 2-core CPU, 2026-12-07), against the unpruned
student's mean over its last 5 of 40 steps:
- the pruned student's first-step loss on the final embedding: 0.92-1.31x (a fresh student
  starts at 12-16x), so `--init` loaded weights that still produce the embedding;
- its first-step loss on the last tap (block 3), where half the heads are gone: 8.4-15.9x;
- after 20 re-distillation steps (mean of the last 5) that tap's loss is 1.30-1.58x.

The bounds sit at about twice the measured extremes. Teacher agreement does not measure the
recovery at this scale: on the 8 generated images re-distillation changed it by +5.4, +0.0,
-2.5, -1.9 and +3.5 points over the same seeds, and pruning had cost 0.2-2.2 points. The
claims benchmark's deploy arm measures what pruning costs in GT mIoU on the reference teacher.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from students.export import read_export_meta
from students.load import load_sam
from tests.conftest import REPO, unplaced_env

pytestmark = pytest.mark.slow

KEEPS_EMBED = 2.5  # pruned first-step embedding loss / unpruned final (measured <= 1.31)
PRUNING_COST = 4.0  # pruned first-step tap loss / unpruned final (measured >= 8.4)
RECOVERED = 3.0  # re-distilled final tap loss / unpruned final (measured <= 1.58)
DISTILL = ["--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu"]
DISTILL += ["--engine", "torch", "--log-every", "20"]


def _run(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=unplaced_env(),
        capture_output=True,
        text=True,
        timeout=900,  # only a hang stops here
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def _losses(log) -> list[dict[str, float]]:
    with open(log, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def _final(rows, key: str) -> float:
    """`key`'s mean over the last 5 steps (one step's batch is 4 of 8 images)."""
    return sum(row[key] for row in rows[-5:]) / 5


def test_pruned_then_redistilled_student_wins_back_the_tap_loss(distilled_run, tmp_path):
    cache = str(distilled_run / "cache")
    student = distilled_run / "run" / "student.pt"
    _run(
        "launch/export.py",
        "--ckpt",
        str(student),
        "--out",
        str(tmp_path / "pruned"),
        "--prune",
        "heads",
        "--ratio",
        "0.5",
        "--calib-shards",
        cache,
    )
    pruned = tmp_path / "pruned" / "pruned.pt"
    report = json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert report["removed_fraction"] == 0.5
    params = [
        sum(p.numel() for p in load_sam(f).image_encoder.parameters()) for f in (student, pruned)
    ]
    assert params == [report["params_before"], report["params_after"]]
    _run(
        "launch/distill.py",
        "--init",
        str(pruned),
        "--shards",
        cache,
        "--out",
        str(tmp_path / "re"),
        "--steps",
        "20",
        "--lr",
        "1e-3",
        *DISTILL,
    )
    meta = read_export_meta(tmp_path / "re" / "student.pt")
    assert meta["student"] == read_export_meta(pruned)["student"]  # the pruned architecture
    unpruned = _losses(distilled_run / "run" / "log.csv")
    pruned_run = _losses(tmp_path / "re" / "log.csv")
    embed, tap = (_final(unpruned, k) for k in ("loss_embed", "loss_block3"))
    first = pruned_run[0]
    print(
        f"embedding loss: unpruned {embed:.4f}, pruned {first['loss_embed']:.4f}; block-3 tap "
        f"loss: unpruned {tap:.4f}, pruned {first['loss_block3']:.4f}, "
        f"re-distilled {_final(pruned_run, 'loss_block3'):.4f}"
    )
    assert first["loss_embed"] < KEEPS_EMBED * embed  # the pruned weights, not a fresh student
    assert first["loss_block3"] > PRUNING_COST * tap  # pruning cost the tap
    assert _final(pruned_run, "loss_block3") < RECOVERED * tap  # and re-distillation won it back
