"""Shared fixtures: a tiny random SAM written in the official checkpoint layout, generated data."""

from __future__ import annotations

import os
import textwrap
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


def unplaced_env(**extra: str) -> dict[str, str]:
    """This process's environment without placement variables, plus `extra`."""
    return {k: v for k, v in os.environ.items() if k not in PLACEMENT} | extra


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
