"""The distillation entry point, run for real (subprocesses, DeepSpeed on CPU with gloo)."""

import json
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from segment_anything import SamPredictor

from distill.schedule import lr_at
from students.export import read_export_meta
from students.load import load_sam
from teachers.runtime.files import file_sha256
from tests.conftest import killer_script
from tests.distill.runs import (
    BASE,
    assert_same_columns,
    assert_same_encoder,
    column,
    read_log,
    run_distill,
)

pytestmark = pytest.mark.slow


def test_end_to_end_loss_falls_and_student_runs_in_sam_predictor(cache, tmp_path):
    out = tmp_path / "run"
    run_distill(
        "--shards",
        str(cache),
        "--out",
        str(out),
        "--steps",
        "36",
        "--batch-size",
        "4",
        "--lr",
        "2e-3",
        *BASE,
    )
    rows = read_log(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 37))
    embed = [float(r["loss_embed"]) for r in rows]
    assert np.mean(embed[-5:]) < 0.5 * np.mean(embed[:5])  # falls clearly
    weights = [float(r["weight_embed"]) for r in rows]
    assert weights[0] == pytest.approx(0.2) and weights[-1] > 0.99  # progressive DLD by default
    # DeepSpeed steps with the engine's schedule: warm-up over 5% of 36 steps (1), then cosine.
    expected = [lr_at(step, 36, 2e-3, 1, 0.01) for step in range(36)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-6)
    assert (out / "training.png").stat().st_size > 10_000

    meta = read_export_meta(out / "student.pt")
    assert meta["student"]["name"] == "dfa_t" and meta["step"] == 36 and meta["img_size"] == 256
    sam = load_sam(out / "student.pt")
    assert not any(k.startswith("image_encoder.projections") for k in sam.state_dict())
    predictor = SamPredictor(sam)
    predictor.set_image(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    masks, scores, _ = predictor.predict(box=np.array([10, 10, 80, 60]), multimask_output=True)
    assert masks.shape == (3, 90, 120) and np.isfinite(scores).all()


def test_student_options_build_a_narrower_student_that_student_pt_rebuilds(cache, tmp_path):
    out = tmp_path / "run"
    args = ["--shards", str(cache), "--out", str(out), "--steps", "2", "--batch-size", "2"]
    run_distill(*args, *BASE, "--student-options", "embed_dim=64,mlp_ratio=1.5")
    sam = load_sam(out / "student.pt")
    assert sam.image_encoder.student_kwargs == {"img_size": 256, "embed_dim": 64, "mlp_ratio": 1.5}
    assert sam.image_encoder.blocks[0].mlp.lin1.weight.shape == (96, 64)  # width 64, hidden 1.5x
    bad = run_distill(
        *args[:3],
        str(tmp_path / "bad"),
        *args[4:],
        *BASE,
        "--student-options",
        "depht=4",
        check=False,
    )
    assert bad.returncode == 2
    assert "--student dfa_t --student-options 'depht=4': " in bad.stderr
    assert "unexpected keyword argument 'depht'" in bad.stderr


def test_one_and_two_ranks_give_the_same_loss_trajectory(cache, tmp_path):
    args = [
        "--shards",
        str(cache),
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        *BASE,
    ]
    run_distill(*args, "--out", str(tmp_path / "one"))
    run_distill(*args, "--out", str(tmp_path / "two"), launcher="deepspeed")
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    # Same global batches, gradients summed over accumulation vs over ranks: float rounding only.
    assert_same_columns(one, two, ["loss_total"])
    a = column(one, "loss_total")
    assert a[-1] < a[0]


def test_sigkill_then_resume_auto_ends_with_the_weights_of_an_uninterrupted_run(cache, tmp_path):
    args = [
        "--shards",
        str(cache),
        "--steps",
        "10",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "4",
        "--zero-stage",
        "1",
        *BASE,
    ]
    killed = run_distill(
        *args,
        "--out",
        str(tmp_path / "killed"),
        script=killer_script("launch/distill.py", kill_at=6),
        check=False,
    )
    assert killed.returncode == -9
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step00000004"
    refused = run_distill(*args, "--out", str(tmp_path / "killed"), check=False)
    assert refused.returncode == 2 and "--resume auto" in refused.stderr

    resumed = run_distill(*args, "--out", str(tmp_path / "killed"), "--resume", "auto")
    assert "at step 4" in resumed.stdout
    run_distill(*args, "--out", str(tmp_path / "straight"))
    assert [int(r["step"]) for r in read_log(tmp_path / "killed")] == list(range(1, 11))
    assert_same_encoder(tmp_path / "killed", tmp_path / "straight")
    killed_log, straight_log = read_log(tmp_path / "killed"), read_log(tmp_path / "straight")
    assert_same_columns(killed_log, straight_log, ["loss_total"])


def test_manifest_mismatch_stops_before_training(cache, tmp_path):
    out = tmp_path / "bad"
    args = [
        "--shards",
        str(cache),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--student",
        "dfa_t",
        "--workers",
        "0",
    ]
    result = run_distill(*args, "--teacher", "vit_tiny", "--img-size", "1024", check=False)
    assert result.returncode == 2
    assert "img_size: cache has 256, expected 1024" in result.stderr
    result = run_distill(*args, "--teacher", "vit_h", check=False)
    assert "teacher: cache has 'vit_tiny', expected 'vit_h'" in result.stderr
    result = run_distill(*args, "--teacher-taps", "2", "--codec", "int8", check=False)
    assert "taps: cache has [1, 3], expected [2]" in result.stderr
    assert "codec: cache has 'fp16', expected 'int8'" in result.stderr
    assert not (out / "checkpoints").exists() and not (out / "log.csv").exists()


def _rewrite_sample(src, dst, key_index, field, value):
    """Copy a cache, replacing one field of one sample of shard 0: a sample bad from the start,
    so the manifest describes the shard as written (its bytes and sha256; a shard changed after
    the manifest is refused before training, tests/test_faults.py)."""
    shutil.copytree(src, dst)
    shard = dst / "shard-000000.tar"
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    samples[key_index][field] = value
    with wds.TarWriter(str(shard)) as writer:
        for s in samples:
            writer.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
    manifest = json.loads((dst / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["name"] == shard.name)
    entry |= {"bytes": shard.stat().st_size, "sha256": file_sha256(shard)}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return samples[key_index]["__key__"]


def test_corrupt_sample_is_counted_and_skipped_or_stops(cache, tmp_path):
    key = _rewrite_sample(cache, tmp_path / "cache", 1, "embed.npy", b"not an array")
    args = ["--shards", str(tmp_path / "cache"), "--steps", "6", "--batch-size", "2", *BASE]
    run_distill(*args, "--out", str(tmp_path / "skip"))
    assert int(read_log(tmp_path / "skip")[-1]["num_corrupt"]) >= 1
    stopped = run_distill(
        *args, "--out", str(tmp_path / "stop"), "--on-corrupt", "stop", check=False
    )
    assert stopped.returncode == 2
    assert f"sample {key!r}" in stopped.stderr and "--on-corrupt skip" in stopped.stderr


def test_nan_loss_never_reaches_the_weights(cache, tmp_path):
    nan = np.full((256, 16, 16), np.nan, dtype=np.float16)
    buf = __import__("io").BytesIO()
    np.save(buf, nan)
    _rewrite_sample(cache, tmp_path / "cache", 0, "embed.npy", buf.getvalue())
    out = tmp_path / "run"
    run_distill(
        "--shards",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--steps",
        "8",
        "--batch-size",
        "2",
        *BASE,
    )
    rows = read_log(out)
    assert int(rows[-1]["num_nonfinite"]) >= 1
    assert all(np.isfinite(float(r["loss_total"])) for r in rows)
    state = load_sam(out / "student.pt").image_encoder.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
