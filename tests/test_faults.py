"""Faults and careless input at the entry points: each stops before any work with one line that
names the file or flag and the fix, and leaves what was written before intact."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from eval.scenes.photos import make_photo_coco
from teachers import load_teacher
from teachers.cache import plan_cache, write_cache
from teachers.cache_read import verify_cache
from tests.conftest import REPO, unplaced_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_photo_coco(root / "images", "train", 6, seed=3, min_side=64, max_side=96)
    teacher = load_teacher("vit_tiny", taps=(1, 3))
    write_cache(teacher, plan_cache(str(root / "images"), 2), root / "cache", progress=False)
    return root / "cache"


def _distill(shards, out, *extra):
    cmd = [sys.executable, "launch/distill.py", "--shards", str(shards), "--out", str(out)]
    cmd += ["--steps", "2", "--batch-size", "2", "--engine", "torch", "--device", "cpu"]
    cmd += ["--workers", "0", "--no-progress", *extra]
    return subprocess.run(
        cmd, cwd=REPO, env=unplaced_env(), capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("fault", ["deleted", "cut"])
def test_a_lost_or_cut_shard_stops_distill_before_step_one_and_names_it(cache, tmp_path, fault):
    broken = tmp_path / "cache"
    shutil.copytree(cache, broken)
    shard = broken / "shard-000001.tar"
    if fault == "deleted":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:1000])
    done = _distill(broken, tmp_path / "run")
    assert done.returncode == 2, done.stdout[-1000:] + done.stderr[-1000:]
    assert str(shard) in done.stderr and "rerun launch/cache_teacher.py" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "log.csv").exists()  # no step was taken
    # the shards that are left are untouched: the intact ones still verify
    report = verify_cache(cache, load_teacher("vit_tiny", taps=(1, 3)), num_recompute=1)
    assert report.ok


def test_a_nan_learning_rate_is_refused_by_name(cache, tmp_path):
    done = _distill(cache, tmp_path / "run", "--lr", "nan")
    assert done.returncode == 2
    assert "argument --lr: expected a finite number, got 'nan'" in done.stderr
    assert "Traceback" not in done.stderr
