"""The adapt entry point, run for real: subprocesses, DeepSpeed on CPU with gloo, SIGKILL and
resume, bad input, and what adaptation buys on the synthetic camouflage domain."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor

from eval.scenes.domain import make_domain
from students import load_sam
from students.adapters import list_adapters
from students.adapters.export import read_adapted_meta
from teachers.runtime.files import file_sha256
from tests.conftest import killer_script
from tests.distill.runs import assert_same_columns, read_log, run_adapt

pytestmark = pytest.mark.slow

BASE = ["--workers", "0", "--no-progress", "--device", "cpu", "--log-every", "1"]


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    return make_domain(tmp_path_factory.mktemp("adapt") / "dom", num_train=8, num_val=2, size=64)


def _args(ckpt, data, method: str, steps: int, batch_size: int = 2) -> list[str]:
    """The flags of a run of `method` from `ckpt` on `data`, all but --out."""
    return ["--ckpt", str(ckpt), "--data", str(data), "--method", method, "--steps", str(steps),
            "--batch-size", str(batch_size), *BASE]  # fmt: skip


def test_adapt_writes_log_plot_and_an_adapted_pt_for_sam_predictor(domain, tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    args = ["--ckpt", str(tiny_ckpt), "--data", str(domain), "--out", str(out)]
    result = run_adapt(
        *args,
        "--method",
        "lora",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--val-every",
        "2",
        "--merge",
        "--engine",
        "torch",
        *BASE,
    )
    assert "8 pairs, 0 skipped" in result.stdout and "before adaptation: val IoU" in result.stdout
    rows = read_log(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [bool(r["val_iou"]) for r in rows] == [False, True, False, True]
    assert all(0 <= float(r["val_iou"]) <= 1 for r in rows if r["val_iou"])
    assert (out / "training.png").stat().st_size > 10_000
    assert set(json.loads((out / "val_before.json").read_text())) == {
        "val_iou",
        "val_dice",
        "val_area_ratio",
    }
    meta = read_adapted_meta(out / "adapted.pt")
    assert meta["method"] == "lora" and meta["merged"] and meta["step"] == 4
    assert meta["base"]["sha256"] == file_sha256(tiny_ckpt)
    sam = load_sam(out / "adapted.pt")
    predictor = SamPredictor(sam)
    predictor.set_image(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    masks, scores, _ = predictor.predict(box=np.array([0, 0, 70, 50]), multimask_output=False)
    assert masks.shape == (1, 50, 70) and np.isfinite(scores).all()
    again = run_adapt(*args, "--method", "lora", "--steps", "4", *BASE, check=False)
    assert again.returncode == 2 and "--resume auto" in again.stderr


def _state(path):
    return load_sam(path).state_dict()


def test_sigkill_then_resume_auto_equals_an_uninterrupted_run(domain, tiny_ckpt, tmp_path):
    args = _args(tiny_ckpt, domain, "conv_lora", 6)
    args += ["--checkpoint-every", "3", "--val-every", "3"]
    killed = tmp_path / "killed"
    script = killer_script("launch/adapt.py", kill_at=5)
    run = run_adapt(*args, "--out", str(killed), script=script, check=False)
    assert run.returncode == -9, run.stderr[-2000:]
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step00000003"
    resumed = run_adapt(*args, "--out", str(killed), "--resume", "auto")
    assert "at step 3" in resumed.stdout
    run_adapt(*args, "--out", str(tmp_path / "straight"))
    assert [int(r["step"]) for r in read_log(killed)] == list(range(1, 7))
    a, b = _state(killed / "adapted.pt"), _state(tmp_path / "straight" / "adapted.pt")
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    assert_same_columns(read_log(killed), read_log(tmp_path / "straight"), ["loss_total"])
    # The checkpoint holds what trains, not the frozen base encoder it rests on.
    ckpt = next((killed / "checkpoints").glob("step*/mp_rank_00_model_states.pt"))
    module = torch.load(ckpt, weights_only=False)["module"]  # this test's own file
    assert any(".lora_B." in k for k in module) and any("mask_decoder" in k for k in module)
    assert not any(k.endswith("qkv.base.weight") or "patch_embed" in k for k in module)


def test_resume_refuses_another_base(domain, tiny_ckpt, tmp_path):
    other = tmp_path / "other.pth"
    state = torch.load(tiny_ckpt, weights_only=True)
    state["mask_decoder.iou_token.weight"] = state["mask_decoder.iou_token.weight"] + 1
    torch.save(state, other)
    args = [
        "--data",
        str(domain),
        "--out",
        str(tmp_path / "r"),
        "--method",
        "decoder",
        "--batch-size",
        "2",
        "--engine",
        "torch",
        *BASE,
    ]
    run_adapt("--ckpt", str(tiny_ckpt), "--steps", "2", *args)
    refused = run_adapt(
        "--ckpt", str(other), "--steps", "3", "--resume", "auto", *args, check=False
    )
    assert refused.returncode == 2
    assert file_sha256(other) in refused.stderr and file_sha256(tiny_ckpt) in refused.stderr


def test_one_and_two_processes_give_the_same_losses(domain, tiny_ckpt, tmp_path):
    args = _args(tiny_ckpt, domain, "conv_lora", 4)
    args += ["--micro-batch-size", "1", "--val-every", "2", "--zero-stage", "1"]
    run_adapt(*args, "--out", str(tmp_path / "one"))
    run_adapt(*args, "--out", str(tmp_path / "two"), launcher="deepspeed")
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert_same_columns(one, two, ["loss_total", "loss_aux"])
    val = lambda rows: [float(r["val_iou"]) for r in rows if r["val_iou"]]  # noqa: E731
    np.testing.assert_allclose(val(one), val(two), atol=1e-6)


def test_bad_training_input_is_counted_or_stops_naming_the_file(domain, tiny_ckpt, tmp_path):
    import shutil

    data = tmp_path / "dom"
    shutil.copytree(domain, data)
    (data / "train" / "masks" / "train_00003.png").unlink()  # an image without a mask
    Image.new("L", (20, 20), 255).save(data / "train" / "masks" / "train_00004.png")  # wrong size
    args = [*_args(tiny_ckpt, data, "decoder", 4, batch_size=4), "--engine", "torch"]
    result = run_adapt(*args, "--out", str(tmp_path / "skip"))
    assert "7 pairs, 1 skipped: 1 no_mask" in result.stdout
    rows = read_log(tmp_path / "skip")
    assert int(rows[-1]["num_bad"]) == 1  # the wrong-size mask, met and replaced
    stop = run_adapt(*args, "--out", str(tmp_path / "stop"), "--on-bad", "stop", check=False)
    assert stop.returncode == 2 and "train_00003.png" in stop.stderr and "no mask" in stop.stderr


def test_adapt_trains_on_coco_instances_with_gt_boxes(tiny_ckpt, tmp_path):
    from eval.scenes.synthetic import make_coco

    make_coco(tmp_path / "coco", split="train2017", num_images=4, seed=1)
    make_coco(tmp_path / "coco", split="val2017", num_images=2, seed=2)
    args = ["--ckpt", str(tiny_ckpt), "--data", str(tmp_path / "coco"), "--method", "decoder"]
    args += ["--steps", "2", "--batch-size", "2", "--engine", "torch", *BASE]
    refused = run_adapt(*args, "--out", str(tmp_path / "full"), check=False)
    assert refused.returncode == 2 and "--prompt gt_box" in refused.stderr
    result = run_adapt(*args, "--out", str(tmp_path / "gt"), "--prompt", "gt_box")
    # one pair per usable instance of the annotation file, crowds and small ones counted apart
    from teachers.mask_folders import MIN_INSTANCE_AREA, coco_split

    anns = json.loads(coco_split(tmp_path / "coco", "train")[0].read_text())["annotations"]
    crowd = sum(1 for a in anns if a.get("iscrowd"))
    small = sum(1 for a in anns if not a.get("iscrowd") and a["area"] < MIN_INSTANCE_AREA)
    usable = len(anns) - crowd - small
    assert crowd > 0 and usable > 4  # the generator's crowds; more instances than images
    reasons = ", ".join(f"{n} {r}" for r, n in (("crowd", crowd), ("small", small)) if n)
    assert f"train: {usable} pairs, {crowd + small} skipped: {reasons}" in result.stdout
    assert "exported" in result.stdout
    rows = read_log(tmp_path / "gt")
    assert [int(r["step"]) for r in rows] == [1, 2]
    # each step's mask loss is computed on its instances (none replaced as bad)
    assert all(np.isfinite(float(r["loss_mask"])) and float(r["loss_mask"]) > 0 for r in rows)
    assert all(int(r["num_bad"]) == 0 for r in rows)


@pytest.mark.parametrize("method", list_adapters())
def test_every_adapter_method_trains_under_the_default_deepspeed_engine(
    method, domain, tiny_ckpt, tmp_path
):
    """The default engine (DeepSpeed, one process on CPU with gloo) flattens and broadcasts every
    trainable parameter: a strided one (META's channels_last prior once) fails there only."""
    out = tmp_path / method
    args = ["--ckpt", str(tiny_ckpt), "--data", str(domain), "--out", str(out)]
    if method == "cad":  # its default 256-channel 512-px CNN took a minute here
        args += ["--options", "width=32,input_size=64"]
    run_adapt(*args, "--method", method, "--steps", "2", "--batch-size", "2", *BASE)
    # DeepSpeed's own checkpoint layout, which the torch engine does not write.
    assert (out / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt").is_file()
    rows = read_log(out)
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["loss_total"])) for r in rows)
    assert read_adapted_meta(out / "adapted.pt")["method"] == method
