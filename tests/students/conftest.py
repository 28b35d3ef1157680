"""Shared fixtures of the student tests: one briefly distilled student (int8 on random weights
quantizes unrealistically; pruning needs an agreement to lose and recover)."""

import pytest

from tests.distill.runs import run_distill


@pytest.fixture(scope="session")
def distilled_run(tiny_coco):
    """The session's `tiny_coco` folder (`coco/`, `cache/`) with `run/student.pt` added: dfa_t
    distilled 40 steps at lr 2e-3 from the cache. Tests read it."""
    args = ["--shards", str(tiny_coco / "cache"), "--out", str(tiny_coco / "run")]
    args += ["--student", "dfa_t", "--steps", "40", "--batch-size", "4", "--lr", "2e-3"]
    args += ["--workers", "0", "--no-progress", "--device", "cpu", "--engine", "torch"]
    args += ["--log-every", "20"]
    run_distill(*args)
    return tiny_coco
