import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import webdataset as wds

import teachers.cache as cache_module
from eval.scenes.synthetic import make_coco
from teachers import codecs, load_teacher, preprocess
from teachers.cache import channel_axis, plan_cache, write_cache
from teachers.cache_read import check_manifest, load_manifest, read_cache, verify_cache
from teachers.preprocess import decode_image
from teachers.runtime.placement import DistEnv
from teachers.runtime.preempt import REQUEUE_EXIT, Preempted, StopRequest
from tests.conftest import REPO, unplaced_env

SLACK = 1e-5  # teacher rounding differences between batch sizes on the CPU


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root, num_images=8, seed=0)
    return root


def _cache(teacher, images, out, **kw):
    plan = plan_cache(str(images), kw.pop("samples_per_shard", 3), kw.pop("limit", None))
    return write_cache(teacher, plan, out, progress=False, **kw)


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_features_read_back_within_codec_bound(teacher, coco_root, tmp_path, codec):
    manifest = _cache(teacher, coco_root, tmp_path, codec=codec, batch_size=3)
    assert manifest["complete"] and manifest["num_samples"] == 8 and manifest["codec"] == codec
    samples = list(read_cache(tmp_path, teacher="vit_tiny", taps=[1, 3], img_size=256, codec=codec))
    assert len(samples) == 8
    for s in samples:
        image = decode_image(s.image)
        pre = preprocess(image, 256)
        assert s.meta["orig_hw"] == list(image.shape[:2]) and s.meta["input_hw"] == list(
            pre.input_hw
        )
        fresh = teacher(pre.image[None])
        assert set(s.features) == {"embed", "block1", "block3"}
        for name, cached in s.features.items():
            ref = fresh[name][0]
            assert cached.shape == ref.shape
            bound = codecs.error_bound(ref, codec, channel_axis(name)) + SLACK * (1 + ref.abs())
            err = (cached - ref).abs()
            assert (err <= bound).all(), f"{codec} {name}: {float((err / bound).max())}x bound"
            assert err.max() > 0  # a lossy codec really was applied


def test_coco_annotations_and_image_bytes_are_carried(teacher, coco_root, tmp_path):
    _cache(teacher, coco_root, tmp_path)
    ann_file = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    by_name = {img["file_name"]: img for img in ann_file["images"]}
    samples = list(read_cache(tmp_path))
    for s in samples:
        img = s.ann["image"]
        assert by_name[img["file_name"]] == img
        expected = [a for a in ann_file["annotations"] if a["image_id"] == img["id"]]
        assert s.ann["annotations"] == expected
        assert s.image == (coco_root / "val2017" / img["file_name"]).read_bytes()  # not re-encoded
    # Stock webdataset + numpy read the same shards without our code.
    raw = next(
        iter(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False).decode())
    )
    assert raw["embed.npy"].dtype == np.float16 and raw["embed.npy"].shape == (256, 16, 16)
    assert raw["block1.npy"].shape == (16, 16, 64)


def test_reader_refuses_mismatching_manifest(teacher, coco_root, tmp_path):
    _cache(teacher, coco_root, tmp_path, codec="int8", limit=2)
    with pytest.raises(ValueError, match="codec: cache has 'int8', expected 'fp16'"):
        next(read_cache(tmp_path, codec="fp16"))
    with pytest.raises(ValueError, match=r"taps: cache has \[1, 3\], expected \[7, 15\]"):
        next(read_cache(tmp_path, taps=[7, 15]))
    with pytest.raises(ValueError, match="teacher: cache has 'vit_tiny', expected 'vit_h'"):
        check_manifest(load_manifest(tmp_path), teacher="vit_h", img_size=256)


def test_rerun_with_other_settings_is_refused(teacher, coco_root, tmp_path):
    _cache(teacher, coco_root, tmp_path, limit=4)
    with pytest.raises(
        ValueError,
        match="already holds a cache made with other settings.*codec: cache has 'fp16', this run 'bf16'",
    ):
        _cache(teacher, coco_root, tmp_path, limit=4, codec="bf16")
    # other inputs are not other settings: the finished shards whose inputs are unchanged stay
    before = json.loads((tmp_path / "shard-000000.json").read_text())
    manifest = _cache(teacher, coco_root, tmp_path, limit=5)
    assert manifest["complete"] and manifest["num_samples"] == 5
    assert json.loads((tmp_path / "shard-000000.json").read_text()) == before


def test_ranks_split_shards_without_overlap(teacher, coco_root, tmp_path):
    for rank in (1, 0):
        manifest = _cache(teacher, coco_root, tmp_path, env=DistEnv(rank, 2, 0))
        assert manifest["complete"] == (rank == 0)
    records = [json.loads((tmp_path / f"shard-{i:06d}.json").read_text())["keys"] for i in range(3)]
    keys = [k for r in records for k in r]
    assert len(keys) == len(set(keys)) == 8


def test_verify_names_truncated_and_corrupted_shards(teacher, coco_root, tmp_path):
    _cache(teacher, coco_root, tmp_path)
    report = verify_cache(tmp_path, teacher, num_recompute=3)
    assert report.ok and report.num_recomputed == 3 and report.num_checked_samples == 8
    assert 0 < report.max_error_ratio <= 1
    shard1, shard2 = tmp_path / "shard-000001.tar", tmp_path / "shard-000002.tar"
    shard1.write_bytes(shard1.read_bytes()[:5000])  # truncated
    data = bytearray(shard2.read_bytes())
    data[700] ^= 0xFF  # one flipped bit in the payload
    shard2.write_bytes(bytes(data))
    report = verify_cache(tmp_path)
    assert set(report.bad_shards) == {"shard-000001.tar", "shard-000002.tar"}
    assert report.bad_shards["shard-000002.tar"] == "sha256 mismatch"
    result = subprocess.run(
        [sys.executable, "launch/cache_teacher.py", "--out", str(tmp_path), "--verify", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    assert (
        "BAD shard-000001.tar" in result.stdout
        and "BAD shard-000002.tar: sha256 mismatch" in result.stdout
    )
    assert "BAD shard-000000.tar" not in result.stdout


def test_verify_catches_features_from_another_teacher(coco_root, tmp_path, tiny_ckpt):
    other = load_teacher("vit_tiny", taps=(1, 3))  # seed-0 random weights, not tiny_ckpt's
    other.checkpoint_sha256 = load_teacher("vit_tiny", tiny_ckpt).checkpoint_sha256
    _cache(other, coco_root, tmp_path, limit=3)
    report = verify_cache(
        tmp_path, load_teacher("vit_tiny", tiny_ckpt, taps=(1, 3)), num_recompute=2
    )
    assert not report.ok and "differs from the teacher" in report.bad_shards["shard-000000.tar"]


# --- crash safety and multi-process runs, through the real CLI -------------------------------

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import teachers.cache as cache
    write, seen = cache._ShardWriter.write, []
    def write_then_die(self, sample):
        write(self, sample)
        seen.append(sample["__key__"])
        if len(seen) == {kill_after}:
            os.kill(os.getpid(), signal.SIGKILL)
    cache._ShardWriter.write = write_then_die
    from teachers.cache_cli import main
    main(sys.argv[1:])
    """
)


def _cli(out, coco_root, ckpt, extra_env=None, script=None):
    args = [
        "--teacher",
        "vit_tiny",
        "--teacher-ckpt",
        str(ckpt),
        "--images",
        str(coco_root),
        "--out",
        str(out),
        "--samples-per-shard",
        "3",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--no-progress",
        "--device",
        "cpu",
    ]
    cmd = (
        [sys.executable, "-c", script, *args]
        if script
        else [sys.executable, "launch/cache_teacher.py", *args]
    )
    env = unplaced_env(**(extra_env or {}))
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _samples(out):
    return {s.key: s.features for s in read_cache(out)}


@pytest.mark.slow
def test_sigkill_midway_then_rerun_yields_each_input_once(coco_root, tiny_ckpt, tmp_path):
    out = tmp_path / "killed"
    proc = _cli(out, coco_root, tiny_ckpt, script=KILLER.format(repo=str(REPO), kill_after=5))
    proc.communicate(timeout=600)
    assert proc.returncode == -9
    assert (out / "shard-000000.tar").exists() and not (out / "shard-000001.tar").exists()
    assert (out / "shard-000001.tar.partial").exists()  # the half shard never got its final name

    rerun = _cli(out, coco_root, tiny_ckpt)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert not list(out.glob("*.partial"))
    assert verify_cache(out).ok
    keys = [s.key for s in read_cache(out)]
    assert len(keys) == len(set(keys)) == 8

    clean = tmp_path / "clean"
    assert _cli(clean, coco_root, tiny_ckpt).wait(timeout=600) == 0
    resumed, reference = _samples(out), _samples(clean)
    assert resumed.keys() == reference.keys()
    for key, feats in reference.items():
        for name, value in feats.items():
            # the same computation in the same batches: bit-identical in a probe (max error 0)
            assert torch.equal(resumed[key][name], value), (key, name)


@pytest.mark.slow
def test_two_processes_produce_the_samples_of_one(coco_root, tiny_ckpt, tmp_path):
    procs = [
        _cli(tmp_path / "two", coco_root, tiny_ckpt, {"RANK": str(r), "WORLD_SIZE": "2"})
        for r in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert _cli(tmp_path / "one", coco_root, tiny_ckpt).wait(timeout=600) == 0
    two, one = load_manifest(tmp_path / "two"), load_manifest(tmp_path / "one")
    assert two["complete"] and two["num_samples"] == one["num_samples"] == 8
    assert [s["num_samples"] for s in two["shards"]] == [s["num_samples"] for s in one["shards"]]
    a, b = _samples(tmp_path / "two"), _samples(tmp_path / "one")
    assert a.keys() == b.keys()
    for key in a:
        for name in a[key]:
            # the same computation split over ranks: bit-identical in a probe (max error 0)
            assert torch.equal(a[key][name], b[key][name]), (key, name)


# --- save and leave on a signal ----------------------------------------------------------------


def _signal_after_first_shard(monkeypatch):
    """Send this process SIGUSR1 right after the first shard is finished (a real signal, to the
    StopRequest the test holds)."""
    finish = cache_module._ShardWriter.finish

    def finish_then_signal(self):
        finish(self)
        if self.index == 0:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(cache_module._ShardWriter, "finish", finish_then_signal)


def _record_keys(out):
    manifest = load_manifest(out)
    names = [s["name"] for s in manifest["shards"]]
    return [
        k
        for name in names
        for k in json.loads((out / name.replace(".tar", ".json")).read_text())["keys"]
    ]


def test_signal_drops_the_shard_in_progress_and_a_rerun_completes(
    teacher, coco_root, tmp_path, monkeypatch
):
    out = tmp_path / "stopped"
    _signal_after_first_shard(monkeypatch)
    with StopRequest() as stop, pytest.raises(Preempted) as caught:
        # Batches of 2, shards of 3: the batch that finishes shard 0 also starts shard 1.
        _cache(teacher, coco_root, out, batch_size=2, stop=stop)
    assert stop.signal == "SIGUSR1"
    message = str(caught.value)
    assert "finishing 1 shard(s)" in message and "shard-000001.tar, which a rerun redoes" in message
    assert "has 1 of 3 shards" in message
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.json", "shard-000000.tar"]
    manifest = load_manifest(out)
    assert not manifest["complete"] and [s["name"] for s in manifest["shards"]] == [
        "shard-000000.tar"
    ]
    report = verify_cache(out)
    assert set(report.bad_shards) == {"shard-000001.tar", "shard-000002.tar"}
    assert all(r.startswith("not finished") for r in report.bad_shards.values())
    assert report.num_checked_samples == 3

    monkeypatch.undo()
    assert _cache(teacher, coco_root, out, batch_size=2)["complete"]
    assert not list(out.glob("*.partial")) and verify_cache(out).ok
    _cache(teacher, coco_root, tmp_path / "straight", batch_size=2)
    keys = _record_keys(out)
    assert len(keys) == len(set(keys)) == 8
    assert keys == _record_keys(tmp_path / "straight")
    assert sorted(s.key for s in read_cache(out)) == sorted(keys)


def test_signal_before_the_first_batch_leaves_at_once(teacher, coco_root, tmp_path):
    stop = StopRequest()
    stop.signal = "SIGTERM"  # as if it came while the teacher loaded
    with pytest.raises(Preempted, match="SIGTERM received: stopped after finishing 0 shard"):
        _cache(teacher, coco_root, tmp_path, stop=stop)
    assert not list(tmp_path.glob("shard-*")) and not load_manifest(tmp_path)["shards"]


WAIT_AFTER_FIRST_SHARD = textwrap.dedent(
    """
    import os, runpy, sys, time
    sys.path.insert(0, {repo!r})
    import teachers.cache as cache
    finish = cache._ShardWriter.finish
    def finish_then_wait(self):
        finish(self)
        # After the first shard and its record are in place, wait until the test has sent its
        # signal (it creates {go!r} after the kill): the signal lands here, not by a race.
        deadline = time.monotonic() + 300  # only a hang of the test stops here
        while self.index == 0 and not os.path.exists({go!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
    cache._ShardWriter.finish = finish_then_wait
    sys.argv = ["launch/cache_teacher.py", *sys.argv[1:]]
    runpy.run_path("launch/cache_teacher.py", run_name="__main__")
    """
)


@pytest.mark.slow
def test_sigusr1_to_the_cli_saves_exits_75_and_a_rerun_completes(coco_root, tiny_ckpt, tmp_path):
    out = tmp_path / "signalled"
    go = tmp_path / "signal-sent"
    script = WAIT_AFTER_FIRST_SHARD.format(repo=str(REPO), go=str(go))
    proc = _cli(out, coco_root, tiny_ckpt, script=script)
    deadline = time.monotonic() + 300  # only a hang stops here
    while not (out / "shard-000000.json").exists():
        assert proc.poll() is None, proc.communicate(timeout=60)
        assert time.monotonic() < deadline, "no shard after 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    go.touch()
    _, stderr = proc.communicate(timeout=300)  # a generous deadline: a hang, not a clock
    assert proc.returncode == REQUEUE_EXIT, stderr
    assert "SIGUSR1 received: saving at the next safe point" in stderr
    assert "SIGUSR1 received: stopped after finishing" in stderr and "rerun redoes" in stderr
    manifest = load_manifest(out)
    assert not manifest["complete"] and len(manifest["shards"]) >= 1
    assert not list(out.glob("*.partial"))

    rerun = _cli(out, coco_root, tiny_ckpt)
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert verify_cache(out).ok and not list(out.glob("*.partial"))
    keys = _record_keys(out)
    assert len(keys) == len(set(keys)) == 8
    assert sorted(s.key for s in read_cache(out)) == sorted(keys)
