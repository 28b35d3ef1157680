"""Shared fixtures: a tiny random SAM written in the official checkpoint layout, generated data,
one process, tmpfs mounts, and the one-line error every entry point gives."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from teachers.build import random_vit_tiny

REPO = Path(__file__).resolve().parent.parent
# Process-placement variables: a test's subprocess must not inherit a launcher's (or SLURM's).
PLACEMENT = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "MASTER_PORT",
)


# Under pytest-xdist (`pytest -n N`) each worker, and every process it starts, takes its share of
# the cores: N workers each running torch's default of one thread per core would oversubscribe
# them, and torch's spinning threads then run slower than one worker alone.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


def pytest_collection_modifyitems(config, items):
    """Files with the most slow tests first, the rest in their own order: the workers of
    `pytest -n N --dist loadfile` take files in this order, so the run ends on short files
    rather than one worker finishing a long one while the others wait."""
    slow = Counter(item.location[0] for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.location[0]])


def free_port() -> int:
    """A TCP port no process listens on now: each test's launcher gets its own, so tests that
    run side by side (`pytest -n`) never meet on one rendezvous port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True, scope="session")
def _own_launcher_ports():
    """The demo's and the GPU check's deepspeed launchers take their port from the environment;
    each pytest process gets free ones."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEMO_PORT", str(free_port()))
        patch.setenv("GPU_CHECK_PORT", str(free_port()))
        yield


def unplaced_env(**extra: str) -> dict[str, str]:
    """This process's environment without placement variables, plus `extra`."""
    return {k: v for k, v in os.environ.items() if k not in PLACEMENT} | extra


@pytest.fixture
def one_process(monkeypatch):
    """An entry point run in this process sees no launcher's placement: one process."""
    for name in PLACEMENT:
        monkeypatch.delenv(name, raising=False)


def one_error_line(err: str) -> str:
    """`err` (stderr) holds one line, `error: ...`, and no traceback."""
    lines = [line for line in err.splitlines() if not line.startswith("WARNING: vit_tiny")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def cache_flags(images: Path) -> list[str]:
    """launch/cache_teacher.py's flags (no --out) for a vit_tiny cache of `images` on the CPU."""
    return [
        "--teacher", "vit_tiny", "--layers", "1,3", "--images", str(images),
        "--samples-per-shard", "4", "--workers", "0", "--device", "cpu", "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> Path:
    """A folder holding `coco/` (8 generated COCO images, seed 3) and `cache/`, their vit_tiny
    cache (random seed-0 teacher, taps 1 and 3, 4 to a shard). Tests read both; one that changes
    the cache copies it first."""
    from tests.distill.runs import tiny_coco_cache

    root = tmp_path_factory.mktemp("tiny_coco")
    tiny_coco_cache(root, num_images=8, seed=3, per_shard=4)
    return root


@pytest.fixture(scope="session")
def tiny_sam():
    return random_vit_tiny(seed=1)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_sam) -> Path:
    """A vit_tiny checkpoint in the official layout: a flat state dict saved with torch.save."""
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    return path


def sam_mask_decoder_params() -> int:
    """Parameters of SAM's mask decoder as `segment_anything`'s own builder (`build_sam.py`)
    makes it, counted on the meta device (no weights are allocated)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        sam = sam_model_registry["vit_b"]()
    return sum(p.numel() for p in sam.mask_decoder.parameters())


def killer_script(entry: str, kill_at: int) -> str:
    """`python -c` code that runs the entry script `entry` (e.g. "launch/distill.py") with the
    process's arguments and SIGKILLs itself right after log.csv got the row of step `kill_at`."""
    return textwrap.dedent(
        f"""
        import os, runpy, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import distill.logs
        write = distill.logs.StepLog.write
        def write_then_die(self, step, values):
            write(self, step, values)
            if step == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)
        distill.logs.StepLog.write = write_then_die
        sys.argv = [{entry!r}, *sys.argv[1:]]
        runpy.run_path({entry!r}, run_name="__main__")
        """
    )


def _tmpfs(path: Path, size: str, *options: str) -> None:
    """Mount a tmpfs of `size` at `path` (as root), or skip saying why, loudly."""
    reason = None
    if os.geteuid() != 0 or shutil.which("mount") is None:
        reason = "mounting a tmpfs needs root and mount(8): run the tests as root"
    else:
        path.mkdir(parents=True, exist_ok=True)
        opts = ",".join([f"size={size}", *options])
        cmd = ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
        if done.returncode != 0:
            reason = f"cannot mount a tmpfs at {path}: {done.stderr.strip()}"
    if reason is not None:  # in the warnings summary too, not only under -rs
        warnings.warn(f"read-only and full-disk tests NOT RUN: {reason}", stacklevel=2)
        pytest.skip(f"NOT RUN: {reason}")


@pytest.fixture
def tmpfs(tmp_path):
    """`tmpfs(size, *options)`: a fresh tmpfs mount under tmp_path, unmounted after the test."""
    points: list[Path] = []

    def mount(size: str, *options: str) -> Path:
        point = tmp_path / f"tmpfs{len(points)}"
        _tmpfs(point, size, *options)
        points.append(point)
        return point

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False, timeout=60)
