"""Shared fixtures: a tiny random SAM written in the official checkpoint layout, generated data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from teachers.build import random_vit_tiny

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_sam():
    return random_vit_tiny(seed=1)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_sam) -> Path:
    """A vit_tiny checkpoint in the official layout: a flat state dict saved with torch.save."""
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    return path
