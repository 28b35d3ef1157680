"""Shared fixtures of the training tests: the vit_tiny cache the distillation runs read."""

import pytest

from tests.distill.runs import tiny_coco_cache


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A vit_tiny cache (random seed-0 teacher, taps 1 and 3) of 8 generated COCO images, 4 to a
    shard. Tests read it; one that changes a cache copies it first."""
    return tiny_coco_cache(tmp_path_factory.mktemp("distill"), num_images=8, seed=3, per_shard=4)
