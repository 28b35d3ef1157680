"""Shared fixtures of the training tests: the vit_tiny cache the distillation runs read."""

import pytest


@pytest.fixture(scope="session")
def cache(tiny_coco):
    """The session's vit_tiny cache of 8 generated COCO images (tests/conftest.py `tiny_coco`).
    Tests read it; one that changes a cache copies it first."""
    return tiny_coco / "cache"
