"""Shared fixtures of the teacher tests."""

import pytest

from teachers import load_teacher


@pytest.fixture(scope="module")
def teacher(tiny_ckpt):
    """vit_tiny from the shared checkpoint (tests/conftest.py), tapping blocks 1 and 3. A module
    that needs another teacher defines its own `teacher`."""
    return load_teacher("vit_tiny", tiny_ckpt, taps=(1, 3))
