"""The training entry scripts run for real in tests: one command (in one process, under the
`deepspeed` launcher with two, or as `python -c` code that wraps the script), its log.csv, and
the comparisons that say two runs ended alike."""

from __future__ import annotations

import csv
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

from eval.scenes.synthetic import make_coco
from students.load import load_sam
from teachers import load_teacher
from teachers.cache import plan_cache, write_cache
from tests.conftest import REPO, free_port, unplaced_env

# The distillation flags every run of these tests shares: a tiny student on a vit_tiny cache.
BASE = [
    "--student",
    "dfa_t",
    "--teacher",
    "vit_tiny",
    "--img-size",
    "256",
    "--workers",
    "0",
    "--no-progress",
    "--device",
    "cpu",
    "--log-every",
    "5",
]


def run_entry(entry, *args, launcher=None, script=None, check=True):
    """`entry` (e.g. "launch/distill.py") with `args`: in this Python, under the `deepspeed`
    launcher with two processes on a free port (`launcher="deepspeed"`), or as the `python -c`
    `script` (which runs the entry itself). With `check`, a failure shows the output's tail."""
    if launcher == "deepspeed":
        deepspeed = Path(sys.executable).parent / "deepspeed"  # the launcher beside this Python
        cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), entry]
    elif script:
        cmd = [sys.executable, "-c", script]
    else:
        cmd = [sys.executable, entry]
    result = subprocess.run(
        [*cmd, *args], cwd=REPO, env=unplaced_env(), capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


run_distill = partial(run_entry, "launch/distill.py")
run_adapt = partial(run_entry, "launch/adapt.py")


def read_log(out: Path) -> list[dict[str, str]]:
    """The rows of a run's `out/log.csv`."""
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> np.ndarray:
    return np.array([float(r[name]) for r in rows])


def assert_same_columns(a: list[dict], b: list[dict], names, rtol: float = 1e-5) -> None:
    """Two runs' logs agree on every column of `names`, to `rtol`."""
    for name in names:
        np.testing.assert_allclose(column(a, name), column(b, name), rtol=rtol)


def assert_same_encoder(a: Path, b: Path) -> None:
    """The image encoders of two runs' `student.pt` (in folders `a` and `b`) are equal up to
    float rounding."""
    wa = load_sam(a / "student.pt").image_encoder.state_dict()
    wb = load_sam(b / "student.pt").image_encoder.state_dict()
    for key in wb:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=1e-5)


def tiny_coco_cache(root: Path, num_images: int, seed: int, per_shard: int) -> Path:
    """A vit_tiny cache (random seed-0 teacher, taps 1 and 3) of `num_images` generated COCO
    images, `per_shard` to a shard, written under `root`: `root/cache`."""
    make_coco(root / "coco", num_images=num_images, seed=seed)
    teacher = load_teacher("vit_tiny", taps=(1, 3))
    write_cache(teacher, plan_cache(str(root / "coco"), per_shard), root / "cache", progress=False)
    return root / "cache"
