"""Atomic writes of the ground floor (`teachers.runtime.files`): whole or nothing, no temporary
file left behind, one creator of a file that several processes race to create."""

from __future__ import annotations

import pytest
import torch

from teachers.runtime.files import (
    atomic_write,
    create_once,
    safe_load,
    save_atomic,
    write_text_atomic,
)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a.json", "old")

    def fail(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_save_atomic_writes_what_safe_load_reads(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3)}
    path = save_atomic(state, tmp_path / "s.pt")
    assert torch.equal(safe_load(path)["w"], state["w"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_create_once_creates_only_the_first_time(tmp_path):
    path = tmp_path / "run.json"
    assert create_once(path, lambda f: f.write("first"))
    assert not create_once(path, lambda f: f.write("second"))
    assert path.read_text() == "first" and not list(tmp_path.glob(".*.tmp"))
