"""Manifest bookkeeping without file locks (`teachers.manifest`): concurrent ranks lose no
entry, and `--verify` repairs or names parts that an interruption lost."""

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import asdict

import pytest

import teachers.manifest as manifest_module
from eval.scenes.synthetic import make_coco
from teachers.cache import plan_cache, write_cache
from teachers.cache_read import load_manifest, read_cache, verify_cache
from teachers.manifest import (
    STALE_TMP_S,
    CacheRun,
    claim_run,
    create_json_once,
    merge_manifest,
    record_path,
    shard_name,
    write_json_atomic,
)
from tests.conftest import REPO, unplaced_env


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root, num_images=6, seed=0)
    return root


def _no_flock(*_args, **_kwargs):
    raise OSError(38, "flock is not supported on this filesystem")


def _cache(teacher, images, out, **kw):
    return write_cache(teacher, plan_cache(str(images), 2), out, progress=False, **kw)


def _run(num_shards: int) -> CacheRun:
    return CacheRun(
        "vit_tiny", "", [1], "fp16", {"embed": "fp16", "block1": "fp16"}, 256, 1, 1, num_shards, "x"
    )


def _fake_part(out, i: int) -> None:
    (out / shard_name(i)).write_bytes(b"")
    write_json_atomic(
        record_path(out, i),
        {"name": shard_name(i), "num_samples": 1, "sha256": str(i), "keys": [str(i)]},
    )


def test_a_merge_from_a_stale_listing_is_merged_again(tmp_path, monkeypatch):
    """Rank A lists the parts, rank B finishes the last shard and merges (complete), then A's
    older manifest lands on top of B's: A lists again and merges once more."""
    monkeypatch.setattr(fcntl, "flock", _no_flock)
    run = _run(2)
    _fake_part(tmp_path, 0)
    real, seen = manifest_module._entries, []

    def entries(out, num_shards):
        listed = real(out, num_shards)
        seen.append(len(listed))
        if len(seen) == 1:  # between A's listing and A's write, B finishes shard 1
            _fake_part(out, 1)
            assert merge_manifest(out, run, num_shards)["complete"]
        return listed

    monkeypatch.setattr(manifest_module, "_entries", entries)
    merged = merge_manifest(tmp_path, run, 2)
    # A lists 1; B lists 2 and checks 2; A's check finds B's part (2) and its second check 2
    assert seen == [1, 2, 2, 2, 2]
    assert merged["complete"] and load_manifest(tmp_path)["complete"]
    assert [s["name"] for s in load_manifest(tmp_path)["shards"]] == [shard_name(0), shard_name(1)]


def test_concurrent_merges_lose_no_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _no_flock)
    run, num = _run(24), 24

    def rank(r: int) -> None:
        for i in range(r, num, 6):
            _fake_part(tmp_path, i)
            merge_manifest(tmp_path, run, num)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    manifest = load_manifest(tmp_path)
    assert manifest["complete"] and len(manifest["shards"]) == num
    assert not list(tmp_path.glob(".*.tmp"))  # every temporary file was renamed or removed


def test_run_settings_are_created_once(tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _no_flock)
    assert create_json_once(tmp_path / "x.json", {"a": 1})
    assert not create_json_once(tmp_path / "x.json", {"a": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    claim_run(tmp_path, _run(2))
    claim_run(tmp_path, _run(2))  # the same settings: a resume
    assert json.loads((tmp_path / "run.json").read_text()) == asdict(_run(2))
    # other inputs: run.json records them and the settings it held come back
    assert claim_run(tmp_path, _run(3)) == asdict(_run(2))
    assert json.loads((tmp_path / "run.json").read_text()) == asdict(_run(3))


def _interrupt(out) -> dict:
    """Leave OUT as a rank killed while writing shard 1's part, after another rank's merge, does:
    no part 1 but a half-written temporary one, and a manifest without shard 1."""
    part = record_path(out, 1)
    original = json.loads(part.read_text())
    part.unlink()
    tmp = out / f".{part.name}.node7.4242.abcd.tmp"
    tmp.write_text(json.dumps(original)[:40])
    old = time.time() - STALE_TMP_S - 60
    os.utime(tmp, (old, old))
    manifest = load_manifest(out)
    manifest["shards"] = manifest["shards"][:1] + manifest["shards"][2:]
    manifest["complete"] = False
    write_json_atomic(out / "manifest.json", manifest)
    return original


def test_verify_repairs_parts_interrupted_mid_write(teacher, coco_root, tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _no_flock)
    assert _cache(teacher, coco_root, tmp_path)["complete"]
    original = _interrupt(tmp_path)
    record_path(tmp_path, 2).write_text('{"name": "shard-000002.tar", "num_sam')  # torn part
    assert not load_manifest(tmp_path)["complete"]
    report = verify_cache(tmp_path)
    assert report.ok and report.num_checked_samples == 6
    assert report.repaired == {
        ".shard-000001.json.node7.4242.abcd.tmp": "removed a temporary file left by an "
        "interrupted write",
        "shard-000001.json": "manifest part was missing: rebuilt from shard-000001.tar",
        "shard-000002.json": "manifest part was unreadable: rebuilt from shard-000002.tar",
        "manifest.json": "merged again from the parts: 3 shards",
    }
    assert json.loads(record_path(tmp_path, 1).read_text()) == original  # the same part
    assert load_manifest(tmp_path)["complete"] and len(list(read_cache(tmp_path))) == 6
    assert not list(tmp_path.glob(".*.tmp"))
    assert verify_cache(tmp_path).repaired == {}  # nothing left to do


def test_verify_cli_reports_repairs_and_names_what_it_cannot_repair(teacher, coco_root, tmp_path):
    _cache(teacher, coco_root, tmp_path)
    _interrupt(tmp_path)
    (tmp_path / shard_name(2)).unlink()  # a shard lost with its part: only a rerun redoes it
    record_path(tmp_path, 2).unlink()
    result = subprocess.run(
        [sys.executable, "launch/cache_teacher.py", "--out", str(tmp_path), "--verify", "0"],
        cwd=REPO,
        env=unplaced_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr
    assert "REPAIRED shard-000001.json: manifest part was missing: rebuilt from" in result.stdout
    assert "BAD shard-000002.tar: not finished (rerun the caching command)" in result.stdout
    assert [s["name"] for s in load_manifest(tmp_path)["shards"]] == [shard_name(0), shard_name(1)]


def test_a_torn_part_counts_as_unfinished_for_a_rerun(teacher, coco_root, tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _no_flock)
    _cache(teacher, coco_root, tmp_path)
    before = json.loads(record_path(tmp_path, 0).read_text())
    record_path(tmp_path, 0).write_text("{")
    assert _cache(teacher, coco_root, tmp_path)["complete"]  # the rerun redoes shard 0
    assert json.loads(record_path(tmp_path, 0).read_text())["keys"] == before["keys"]
    assert load_manifest(tmp_path)["complete"] and verify_cache(tmp_path, repair=False).ok


NO_FLOCK = textwrap.dedent(
    """
    import fcntl, runpy, sys
    sys.path.insert(0, {repo!r})
    def no_flock(*args, **kwargs):
        raise OSError(38, "flock is not supported on this filesystem")
    fcntl.flock = no_flock
    sys.argv = ["launch/cache_teacher.py", *sys.argv[1:]]
    runpy.run_path("launch/cache_teacher.py", run_name="__main__")
    """
)


@pytest.mark.slow
def test_two_processes_without_flock_lose_no_entry(coco_root, tiny_ckpt, tmp_path):
    args = ["--teacher", "vit_tiny", "--teacher-ckpt", str(tiny_ckpt), "--images", str(coco_root)]
    args += ["--out", str(tmp_path), "--samples-per-shard", "1", "--batch-size", "1"]
    args += ["--workers", "0", "--no-progress", "--device", "cpu"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", NO_FLOCK.format(repo=str(REPO)), *args],
            cwd=REPO,
            env=unplaced_env(RANK=str(r), WORLD_SIZE="2", OMP_NUM_THREADS="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    manifest = load_manifest(tmp_path)
    assert manifest["complete"] and len(manifest["shards"]) == 6 and manifest["num_samples"] == 6
    report = verify_cache(tmp_path, repair=False)
    assert report.ok and report.num_checked_samples == 6
