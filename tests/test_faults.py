"""Faults and careless input at the entry points (issue 28, items 1-11): each stops before any
work with one line that names the file or flag and the fix, or skips and counts what it cannot
use, and leaves what was written before intact. The teacher cache's own faults (items 1 and 3, a
16-bit image, a full disk) are tested in tests/teachers/test_cache_faults.py, Ctrl-C (item 8) in
tests/distill/test_train_signals.py (test_ctrl_c_saves_and_leaves_like_sigterm_without_a_traceback,
test_a_second_ctrl_c_leaves_at_once)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.cli import main as eval_main
from eval.masks import main as masks_main
from eval.scenes.photos import make_photo_coco
from eval.scenes.synthetic import make_coco
from launch.adapt import main as adapt_main
from launch.distill import main as distill_main
from launch.export import main as export_main
from students.load import load_sam
from teachers import load_teacher
from teachers.cache import plan_cache, write_cache
from teachers.cache_cli import main as cache_main
from teachers.cache_read import verify_cache
from tests.conftest import REPO, cache_flags, one_error_line, unplaced_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_process")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_photo_coco(root / "images", "train", 6, seed=3, min_side=64, max_side=96)
    teacher = load_teacher("vit_tiny", taps=(1, 3))
    write_cache(teacher, plan_cache(str(root / "images"), 2), root / "cache", progress=False)
    return root / "cache"


def _distill(shards, out, *extra):
    cmd = [sys.executable, "launch/distill.py", "--shards", str(shards), "--out", str(out)]
    cmd += ["--steps", "2", "--batch-size", "2", "--engine", "torch", "--device", "cpu"]
    cmd += ["--workers", "0", "--no-progress", *extra]
    return subprocess.run(
        cmd, cwd=REPO, env=unplaced_env(), capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("fault", ["deleted", "cut"])
def test_a_lost_or_cut_shard_stops_distill_before_step_one_and_names_it(cache, tmp_path, fault):
    broken = tmp_path / "cache"
    shutil.copytree(cache, broken)
    shard = broken / "shard-000001.tar"
    if fault == "deleted":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:1000])
    done = _distill(broken, tmp_path / "run")
    assert done.returncode == 2, done.stdout[-1000:] + done.stderr[-1000:]
    assert str(shard) in done.stderr and "rerun launch/cache_teacher.py" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "log.csv").exists()  # no step was taken
    # the shards that are left are untouched: the intact ones still verify
    report = verify_cache(cache, load_teacher("vit_tiny", taps=(1, 3)), num_recompute=1)
    assert report.ok


def test_a_nan_learning_rate_is_refused_by_name(cache, tmp_path):
    done = _distill(cache, tmp_path / "run", "--lr", "nan")
    assert done.returncode == 2
    assert "argument --lr: expected a finite number, got 'nan'" in done.stderr
    assert "Traceback" not in done.stderr


# -- item 4: an unusable --out is one line, before the work ---------------------------------


@pytest.fixture(scope="module")
def student_pt(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "run"
    done = _distill(cache, out, "--student", "dfa_t")
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "student.pt"


def _entry_points(cache: Path, student: Path, coco: Path, domain: Path) -> dict:
    """name -> (main, argv before --out): each entry point with inputs that would work."""
    train = ["--engine", "torch", "--device", "cpu", "--steps", "1", "--batch-size", "2"]
    return {
        "distill": (distill_main, ["--shards", str(cache), "--student", "dfa_t", *train]),
        "adapt": (adapt_main, ["--ckpt", str(student), "--data", str(domain), *train]),
        "cache": (cache_main, cache_flags(coco)),
        "export": (export_main, ["--ckpt", str(student)]),
        "eval/coco.py": (
            lambda argv: eval_main("coco", argv),
            ["--ckpt", str(student), "--coco-root", str(coco), "--device", "cpu"],
        ),
        "eval/masks.py": (masks_main, ["--ckpt", str(student), "--data", str(domain)]),
    }


@pytest.fixture(scope="module")
def inputs(cache, student_pt, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    make_coco(root / "coco", num_images=2, seed=0)
    domain = root / "domain"
    for split in ("train", "val"):
        (domain / split / "images").mkdir(parents=True)
        (domain / split / "masks").mkdir(parents=True)
        Image.new("RGB", (64, 64), (90, 120, 30)).save(domain / split / "images" / "a.png")
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 255
        Image.fromarray(mask).save(domain / split / "masks" / "a.png")
    return _entry_points(cache, student_pt, root / "coco", domain)


OUT_IS_FILE = {"eval/coco.py", "eval/masks.py"}  # their --out is a result file, not a folder


@pytest.mark.parametrize(
    "name", ["distill", "adapt", "cache", "export", "eval/coco.py", "eval/masks.py"]
)
@pytest.mark.parametrize("fault", ["a file", "under a file", "read-only"])
def test_an_unusable_out_is_one_line_naming_it_before_the_work(
    inputs, name, fault, tmp_path, tmpfs, capsys
):
    main, argv = inputs[name]
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    leaf = "result.json" if name in OUT_IS_FILE else "run"
    out = {
        "a file": tmp_path if name in OUT_IS_FILE else blocker,  # a folder where a file goes
        "under a file": blocker / "sub" / leaf,
        "read-only": tmpfs("1m", "ro") / leaf if fault == "read-only" else None,
    }[fault]
    assert main([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = one_error_line(captured.err)
    assert f"--out {out}" in err
    expected = {
        "a file": "is a folder" if name in OUT_IS_FILE else "is a file",
        "under a file": f"is under {blocker}, which is a file",
        "read-only": "(Read-only file system)",
    }
    assert expected[fault] in err
    assert blocker.read_text() == "not a folder"
    assert "mIoU" not in captured.out  # no evaluation ran before the refusal


# -- item 5: a full disk is one line, leaves no temporary file, and --resume auto finishes ----


def test_a_full_disk_is_one_line_and_resume_finishes_once_space_is_freed(
    cache, student_pt, tmpfs, capsys
):
    saved = student_pt.parent / "checkpoints" / "step00000002" / "engine.pt"
    size = saved.stat().st_size  # one checkpoint of this run, measured on an ordinary disk
    disk = tmpfs(f"{4 * size // 1024 + 1024}k")
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler.write_bytes(b"\0" * (free - int(1.5 * size)))  # room for one checkpoint, not two
    out = disk / "run"
    argv = ["--shards", str(cache), "--out", str(out), "--student", "dfa_t", "--engine", "torch"]
    argv += ["--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "2"]
    argv += ["--steps", "4", "--checkpoint-every", "2"]
    assert distill_main(argv) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.endswith(f"{out}/checkpoints/step00000004/engine.pt: No space left on device"), err
    assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]  # no space held
    assert not (out / "checkpoints" / "step00000004").exists()
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"
    torch.load(out / "checkpoints" / "step00000002" / "engine.pt", weights_only=True)
    filler.unlink()
    assert distill_main([*argv, "--resume", "auto"]) == 0
    assert "at step 2" in capsys.readouterr().out
    assert load_sam(out / "student.pt").image_encoder.img_size == 256


# -- items 6 and 7: bad annotations are named and counted, not computed ---------------------


def test_degenerate_annotations_are_skipped_named_and_counted(tiny_ckpt, tmp_path, capsys):
    root = tmp_path / "coco"
    ann_file = make_coco(root, num_images=3, seed=1)
    gt = json.loads(ann_file.read_text())
    usable = [
        a for a in gt["annotations"] if a["area"] >= 1 and isinstance(a["segmentation"], list)
    ]
    two_points, empty, negative, nan_box = (a["id"] for a in usable[:4])
    for ann in usable[:4]:
        if ann["id"] == two_points:
            ann["segmentation"] = [[1.0, 1.0, 9.0, 9.0]]
        elif ann["id"] == empty:
            ann["segmentation"] = []
        elif ann["id"] == negative:
            ann["bbox"][2] = -ann["bbox"][2]
        else:
            ann["bbox"][1] = float("nan")
    ann_file.write_text(json.dumps(gt))  # NaN as JSON's NaN, as Python's json reads it
    out = tmp_path / "result.json"
    argv = ["--ckpt", str(tiny_ckpt), "--coco-root", str(root), "--out", str(out)]
    assert eval_main("coco", [*argv, "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert f"skipped 4 annotation(s) with unusable geometry (annotation {two_points}: " in (
        captured.err
    )
    assert "4 annotations skipped (bad geometry)" in captured.out
    summary = json.loads(out.read_text())
    reasons = {s["id"]: s["reason"] for s in summary["skipped_annotations"]}
    assert summary["num_annotations_skipped"] == 4 and set(reasons) == {
        two_points,
        empty,
        negative,
        nan_box,
    }
    assert reasons[two_points].startswith("a polygon with 2 point(s)")
    assert reasons[empty] == "segmentation is an empty list"
    assert "negative width" in reasons[negative] and "finite" in reasons[nan_box]
    kept = sum(a["area"] >= 1 for a in gt["annotations"]) - 4
    assert summary["num_instances"] == kept


# -- item 9: no silent overwrite --------------------------------------------------------------


def test_another_runs_student_a_cache_folder_and_an_earlier_export_are_not_overwritten(
    cache, student_pt, tmp_path, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(student_pt, run / "student.pt")
    before = (run / "student.pt").read_bytes()
    argv = ["--shards", str(cache), "--student", "dfa_t", "--engine", "torch", "--device", "cpu"]
    argv += ["--steps", "1", "--batch-size", "2", "--workers", "0", "--no-progress"]
    for resume in ([], ["--resume", "auto"]):
        assert distill_main([*argv, "--out", str(run), *resume]) == 2
        err = one_error_line(capsys.readouterr().err)
        assert f"--out {run} holds student.pt from another run" in err and "--overwrite" in err
    assert (run / "student.pt").read_bytes() == before and not (run / "config.json").exists()
    manifest = (cache / "manifest.json").read_bytes()
    assert distill_main([*argv, "--out", str(cache)]) == 2
    assert "holds a teacher cache (manifest.json)" in one_error_line(capsys.readouterr().err)
    assert (
        not (cache / "config.json").exists() and (cache / "manifest.json").read_bytes() == manifest
    )
    assert distill_main([*argv, "--out", str(run), "--overwrite"]) == 0
    assert (run / "student.pt").read_bytes() != before
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    (deploy / "export.json").write_text("{}")
    assert export_main(["--ckpt", str(student_pt), "--out", str(deploy)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"--out {deploy} holds an earlier export (export.json)" in err and "--overwrite" in err
    assert (deploy / "export.json").read_text() == "{}" and not list(deploy.glob("*.onnx"))


# -- item 11: the small ones ------------------------------------------------------------------


def test_small_ones(inputs, student_pt, tmp_path, capsys):
    from teachers.cache_cli import build_parser

    coco = inputs["eval/coco.py"][1][2:]  # all but --ckpt
    assert eval_main("coco", ["--ckpt", str(tmp_path), *coco]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path} is a folder, not a checkpoint file" in err and "not found" not in err
    helps = {a.dest: a.help for a in build_parser()._actions}
    assert helps["progress"].startswith("Turns off: Show a progress bar.")
    # an empty val split says it is empty
    main, argv = inputs["adapt"]
    data = tmp_path / "domain"
    shutil.copytree(Path(argv[argv.index("--data") + 1]), data)
    for path in (data / "val").rglob("*.png"):
        path.unlink()
    argv = [*argv[: argv.index("--data") + 1], str(data), *argv[argv.index("--data") + 2 :]]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"{data}/val has no usable image/mask pair" in err and "the split is empty" in err
    # a CAD adapted.pt is refused by export, before any file is written
    adapted = tmp_path / "adapted.pt"
    torch.save({"format": "sam-distill-adapted", "method": "cad", "state_dict": {}}, adapted)
    assert export_main(["--ckpt", str(adapted), "--out", str(tmp_path / "deploy")]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"--ckpt {adapted} is an adapted.pt (cad adapter)" in err
    assert not list((tmp_path / "deploy").glob("*.onnx"))
