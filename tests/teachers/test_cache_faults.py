"""Faults and careless input at the teacher cache's entry point (issue 28): an unreadable image
is skipped, listed and added once replaced (item 1), `--verify --repair` mends a shard (item 3),
a 16-bit image is scaled by its range, and a full disk is one line that a rerun finishes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.scenes.photos import make_photo_coco
from teachers import load_teacher
from teachers.cache_cli import main as cache_main
from teachers.cache_read import verify_cache
from teachers.preprocess import decode_image
from tests.conftest import cache_flags, one_error_line

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_process")]


# -- item 1: one unreadable image no longer strands a cache ----------------------------------


def _cache_argv(images: Path, out: Path, *extra: str) -> list[str]:
    return [*cache_flags(images), "--out", str(out), *extra]


def _shard_sha(out: Path) -> dict[str, str]:
    return {
        s["name"]: s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]
    }


@pytest.fixture(scope="module")
def twelve_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("twelve")
    make_photo_coco(root, "train", 12, seed=5, min_side=64, max_side=96)
    return root / "train2017"  # a plain folder of 12 JPEGs


def test_a_truncated_image_is_skipped_listed_and_added_once_replaced(
    twelve_images, tmp_path, capsys
):
    images = tmp_path / "images"
    shutil.copytree(twelve_images, images)
    bad = images / "000000000006.jpg"  # the 6th input: shard 1 of 3
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    out = tmp_path / "cache"
    assert cache_main(_cache_argv(images, out)) == 0
    captured = capsys.readouterr()
    assert f"skipped input 000000000006: cannot decode image {bad}" in captured.err
    assert "11 samples, 1 input(s) skipped" in captured.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 11 and manifest["num_skipped"] == 1
    (skip,) = manifest["skipped"]
    assert skip["key"] == "000000000006" and skip["shard"] == "shard-000001.tar"
    assert skip["origin"] == str(bad) and "truncated" in skip["reason"]
    first = _shard_sha(out)
    # a rerun with the input still bad keeps everything as it is
    assert cache_main(_cache_argv(images, out)) == 0
    assert _shard_sha(out) == first and "rebuilding" not in capsys.readouterr().out
    # replaced by a good file: only its shard is written again
    bad.write_bytes(good)
    assert cache_main(_cache_argv(images, out)) == 0
    assert "rebuilding shard-000001.tar: " + str(bad) in capsys.readouterr().out
    after = _shard_sha(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 12 and manifest["num_skipped"] == 0
    assert after["shard-000000.tar"] == first["shard-000000.tar"]
    assert after["shard-000002.tar"] == first["shard-000002.tar"]
    assert after["shard-000001.tar"] != first["shard-000001.tar"]
    assert verify_cache(out, load_teacher("vit_tiny", taps=(1, 3)), num_recompute=3).ok


def test_on_bad_stop_names_the_input_and_keeps_the_finished_shards(twelve_images, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(twelve_images, images)
    bad = images / "000000000010.jpg"  # in shard 2: shards 0 and 1 finish first
    bad.write_bytes(bad.read_bytes()[:300])
    out = tmp_path / "cache"
    assert cache_main(_cache_argv(images, out, "--on-bad", "stop", "--batch-size", "4")) == 2
    err = one_error_line(capsys.readouterr().err)
    assert str(bad) in err and "--on-bad stop" in err and "keeps its 2 finished shard(s)" in err
    assert not list(out.glob("*.partial"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    report = verify_cache(out)  # the finished shards check out; the last one is not written
    assert report.num_checked_samples == 8 and list(report.bad_shards) == ["shard-000002.tar"]
    # removing the input is not "other settings": the rerun keeps the shards before it
    before = _shard_sha(out)
    bad.unlink()
    assert cache_main(_cache_argv(images, out)) == 0
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 11
    assert {k: v for k, v in _shard_sha(out).items() if k != "shard-000002.tar"} == before


# -- item 3: --verify --repair mends a shard whose sha256 is wrong ---------------------------


def test_verify_repair_rebuilds_a_shard_with_a_wrong_sha256(twelve_images, tmp_path, capsys):
    out = tmp_path / "cache"
    assert cache_main(_cache_argv(twelve_images, out)) == 0
    first = _shard_sha(out)
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size: only the sha256 tells
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    verify = ["--out", str(out), "--verify", "0", "--device", "cpu", "--no-progress"]
    assert cache_main(verify) == 1
    printed = capsys.readouterr().out
    assert "BAD shard-000001.tar: sha256 mismatch" in printed and "add --repair --images" in printed
    # --verify honours --teacher (item 11)
    assert cache_main([*verify, "--teacher", "vit_b"]) == 2
    assert f"--teacher vit_b: {out} was made by vit_tiny" in one_error_line(capsys.readouterr().err)
    assert cache_main([*verify, "--repair"]) == 2
    assert "--repair rebuilds bad shards from the inputs" in one_error_line(capsys.readouterr().err)
    images = ["--images", str(twelve_images), "--workers", "0"]
    assert cache_main([*verify, "--repair", *images]) == 0
    printed = capsys.readouterr().out
    assert "REBUILT shard-000001.tar" in printed and "cache OK" in printed
    assert _shard_sha(out) == first  # byte-identical to the shard first written


# -- 16-bit images are scaled by their range ------------------------------------------------


def _sixteen_bit_png(path: Path) -> np.ndarray:
    wide = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")
    return wide


def test_a_16_bit_image_is_scaled_by_its_range_and_the_cache_says_so(tmp_path, capsys, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    wide = _sixteen_bit_png(folder / "deep.png")
    with Image.open(folder / "deep.png") as img:
        assert np.asarray(img.convert("RGB")).mean() > 250  # PIL alone: near-white
    pixels = decode_image((folder / "deep.png").read_bytes(), "deep.png")
    expected = np.rint(wide * (255 / 65535)).astype(np.uint8)
    assert pixels.dtype == np.uint8 and pixels.shape == (48, 64, 3)
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)
    assert abs(pixels.mean() - wide.mean() / 257) < 0.01
    caplog.clear()
    assert cache_main(_cache_argv(folder, tmp_path / "cache")) == 0
    assert "deep.png: a 16-bit grayscale image, scaled to 8 bits" in caplog.text


# -- a full disk is one line, and a rerun finishes ------------------------------------------


def test_a_full_disk_stops_the_cache_in_one_line_and_a_rerun_finishes(twelve_images, tmpfs, capsys):
    disk = tmpfs("300k")  # run.json fits, the first shard does not
    out = disk / "cache"
    assert cache_main(_cache_argv(twelve_images, out)) == 2
    captured = capsys.readouterr()
    err = one_error_line(captured.err)
    assert err == f"error: {out}/shard-000000.tar.partial: No space left on device"
    assert "Exception ignored" not in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]  # nothing holds the space
    subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True, timeout=60)
    assert cache_main(_cache_argv(twelve_images, out)) == 0
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 12
    assert verify_cache(out).ok
