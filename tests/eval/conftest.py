"""Fixtures for the evaluation tests: generated COCO/LVIS data and tiny SAM checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eval.scenes.synthetic import make_coco, make_lvis
from teachers.build import random_vit_tiny


@pytest.fixture(scope="session")
def eval_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COCO root with 8 generated images (see eval.scenes.synthetic for the special cases)."""
    root = tmp_path_factory.mktemp("evaldata") / "coco"
    make_coco(root)
    return root


@pytest.fixture(scope="session")
def eval_lvis(eval_coco: Path) -> Path:
    """An LVIS root beside eval_coco, its images in eval_coco's train2017/ and val2017/."""
    make_lvis(eval_coco.parent / "lvis", eval_coco)
    return eval_coco.parent / "lvis"


@pytest.fixture(scope="session")
def other_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second vit_tiny checkpoint (seed 2), for --compare-ckpt."""
    path = tmp_path_factory.mktemp("ckpt2") / "sam_vit_tiny_2.pth"
    torch.save(random_vit_tiny(seed=2).state_dict(), path)
    return path
