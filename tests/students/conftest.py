"""Shared fixtures of the student tests: one briefly distilled student (int8 on random weights
quantizes unrealistically; pruning needs an agreement to lose and recover)."""

import pytest

from tests.distill.runs import run_distill, tiny_coco_cache


@pytest.fixture(scope="session")
def distilled_run(tmp_path_factory):
    """`root` holding `coco/` (8 generated images, seed 3), `cache/` (vit_tiny, taps 1 and 3, 4
    to a shard) and `run/student.pt`: dfa_t distilled 40 steps at lr 2e-3. Tests read it."""
    root = tmp_path_factory.mktemp("distilled")
    cache = tiny_coco_cache(root, num_images=8, seed=3, per_shard=4)
    args = ["--shards", str(cache), "--out", str(root / "run"), "--student", "dfa_t"]
    args += ["--steps", "40", "--batch-size", "4", "--lr", "2e-3", "--workers", "0"]
    args += ["--no-progress", "--device", "cpu", "--engine", "torch", "--log-every", "20"]
    run_distill(*args)
    return root
