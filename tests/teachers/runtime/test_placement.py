"""CPU threads split between the processes of a node
(`teachers.runtime.placement.share_cpu_threads`), as the caching and evaluation entry points use it."""

import os

import pytest
import torch

from eval.cli import main as eval_main
from eval.scenes.synthetic import make_coco
from teachers.cache_cli import main as cache_main
from teachers.runtime.placement import cpu_threads_per_process

NODE_CPUS = 8


@pytest.mark.parametrize(
    ("environ", "threads"),
    [
        ({}, 8),
        ({"LOCAL_WORLD_SIZE": "2"}, 4),
        ({"LOCAL_SIZE": "4"}, 2),  # DeepSpeed's launcher
        ({"LOCAL_WORLD_SIZE": "16"}, 1),  # never 0
        ({"LOCAL_WORLD_SIZE": "2", "SLURM_CPUS_PER_TASK": "3"}, 3),  # SLURM's word wins
        ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "5"}, None),  # torch follows OMP itself
    ],
)
def test_threads_per_process(environ, threads):
    assert cpu_threads_per_process(environ, num_cpus=NODE_CPUS) == threads


def test_a_bad_variable_is_named():
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='two' is not an integer"):
        cpu_threads_per_process({"LOCAL_WORLD_SIZE": "two"}, num_cpus=NODE_CPUS)


@pytest.fixture
def two_per_node(monkeypatch):
    """A node of 8 CPUs running 2 processes; torch's thread count restored afterwards."""
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(os, "cpu_count", lambda: NODE_CPUS)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root, num_images=2, seed=0)
    return root


def test_caching_process_takes_half_the_node(two_per_node, coco_root, tiny_ckpt, tmp_path):
    argv = ["--teacher", "vit_tiny", "--teacher-ckpt", str(tiny_ckpt), "--images", str(coco_root)]
    argv += ["--out", str(tmp_path), "--workers", "0", "--no-progress", "--device", "cpu"]
    assert cache_main(argv) == 0
    assert torch.get_num_threads() == NODE_CPUS // 2


def test_evaluation_process_takes_half_the_node(two_per_node, coco_root, tiny_ckpt, capsys):
    argv = ["--ckpt", str(tiny_ckpt), "--coco-root", str(coco_root), "--limit-images", "1"]
    assert eval_main("coco", [*argv, "--no-progress", "--device", "cpu"]) == 0, (
        capsys.readouterr().err
    )
    assert torch.get_num_threads() == NODE_CPUS // 2
