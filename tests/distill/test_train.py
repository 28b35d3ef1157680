"""The distillation entry point, run for real (subprocesses, DeepSpeed on CPU with gloo)."""

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from segment_anything import SamPredictor

from distill.schedule import lr_at
from eval.scenes.synthetic import make_coco
from students.export import read_export_meta
from students.load import load_sam
from teachers import load_teacher
from teachers.cache import plan_cache, write_cache
from teachers.runtime.files import file_sha256
from tests.conftest import REPO, killer_script, unplaced_env

pytestmark = pytest.mark.slow

BASE = [
    "--student",
    "dfa_t",
    "--teacher",
    "vit_tiny",
    "--img-size",
    "256",
    "--workers",
    "0",
    "--no-progress",
    "--device",
    "cpu",
    "--log-every",
    "5",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A vit_tiny cache (random seed-0 teacher, taps 1 and 3) of 8 generated COCO images."""
    root = tmp_path_factory.mktemp("distill")
    make_coco(root / "coco", num_images=8, seed=3)
    teacher = load_teacher("vit_tiny", taps=(1, 3))
    write_cache(teacher, plan_cache(str(root / "coco"), 4), root / "cache", progress=False)
    return root / "cache"


def _run(*args, launcher=None, script=None, check=True):
    env = unplaced_env()
    if launcher == "deepspeed":
        deepspeed = Path(sys.executable).parent / "deepspeed"  # the launcher beside this Python
        cmd = [
            str(deepspeed),
            "--num_gpus",
            "2",
            "--master_port",
            "29731",
            "launch/distill.py",
            *args,
        ]
    elif script:
        cmd = [sys.executable, "-c", script, *args]
    else:
        cmd = [sys.executable, "launch/distill.py", *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _log(out):
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end_loss_falls_and_student_runs_in_sam_predictor(cache, tmp_path):
    out = tmp_path / "run"
    _run(
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
    rows = _log(out)
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
    _run(*args, *BASE, "--student-options", "embed_dim=64,mlp_ratio=1.5")
    sam = load_sam(out / "student.pt")
    assert sam.image_encoder.student_kwargs == {"img_size": 256, "embed_dim": 64, "mlp_ratio": 1.5}
    assert sam.image_encoder.blocks[0].mlp.lin1.weight.shape == (96, 64)  # width 64, hidden 1.5x
    bad = _run(
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
    _run(*args, "--out", str(tmp_path / "one"))
    _run(*args, "--out", str(tmp_path / "two"), launcher="deepspeed")
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    a = np.array([float(r["loss_total"]) for r in one])
    b = np.array([float(r["loss_total"]) for r in two])
    # Same global batches, gradients summed over accumulation vs over ranks: float rounding only.
    np.testing.assert_allclose(a, b, rtol=1e-5)
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
    killed = _run(
        *args,
        "--out",
        str(tmp_path / "killed"),
        script=killer_script("launch/distill.py", kill_at=6),
        check=False,
    )
    assert killed.returncode == -9
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step00000004"
    refused = _run(*args, "--out", str(tmp_path / "killed"), check=False)
    assert refused.returncode == 2 and "--resume auto" in refused.stderr

    resumed = _run(*args, "--out", str(tmp_path / "killed"), "--resume", "auto")
    assert "at step 4" in resumed.stdout
    _run(*args, "--out", str(tmp_path / "straight"))
    assert [int(r["step"]) for r in _log(tmp_path / "killed")] == list(range(1, 11))
    a = load_sam(tmp_path / "killed" / "student.pt").image_encoder.state_dict()
    b = load_sam(tmp_path / "straight" / "student.pt").image_encoder.state_dict()
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    losses = lambda out: [float(r["loss_total"]) for r in _log(out)]  # noqa: E731
    np.testing.assert_allclose(
        losses(tmp_path / "killed"), losses(tmp_path / "straight"), rtol=1e-5
    )


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
    result = _run(*args, "--teacher", "vit_tiny", "--img-size", "1024", check=False)
    assert result.returncode == 2
    assert "img_size: cache has 256, expected 1024" in result.stderr
    result = _run(*args, "--teacher", "vit_h", check=False)
    assert "teacher: cache has 'vit_tiny', expected 'vit_h'" in result.stderr
    result = _run(*args, "--teacher-taps", "2", "--codec", "int8", check=False)
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
    _run(*args, "--out", str(tmp_path / "skip"))
    assert int(_log(tmp_path / "skip")[-1]["num_corrupt"]) >= 1
    stopped = _run(*args, "--out", str(tmp_path / "stop"), "--on-corrupt", "stop", check=False)
    assert stopped.returncode == 2
    assert f"sample {key!r}" in stopped.stderr and "--on-corrupt skip" in stopped.stderr


def test_nan_loss_never_reaches_the_weights(cache, tmp_path):
    nan = np.full((256, 16, 16), np.nan, dtype=np.float16)
    buf = __import__("io").BytesIO()
    np.save(buf, nan)
    _rewrite_sample(cache, tmp_path / "cache", 0, "embed.npy", buf.getvalue())
    out = tmp_path / "run"
    _run(
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
    rows = _log(out)
    assert int(rows[-1]["num_nonfinite"]) >= 1
    assert all(np.isfinite(float(r["loss_total"])) for r in rows)
    state = load_sam(out / "student.pt").image_encoder.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())


SIGNALLER = textwrap.dedent(
    """
    import os, runpy, signal, sys
    sys.path.insert(0, {repo!r})
    import distill.logs
    write = distill.logs.StepLog.write
    def write_then_signal(self, step, values):
        write(self, step, values)  # rank 0 only: the other ranks learn of it through the step
        if step == {signal_at}:
            os.kill(os.getpid(), signal.SIGUSR1)
    distill.logs.StepLog.write = write_then_signal
    import distill.engine
    save = distill.engine.DeepSpeedEngine._save_files
    def save_under_fire(self, *args):
        if self.stop.requested:  # the save the signal asked for: a second signal meanwhile
            os.kill(os.getpid(), signal.SIGTERM)
        save(self, *args)
    distill.engine.DeepSpeedEngine._save_files = save_under_fire
    sys.argv = ["launch/distill.py", *sys.argv[1:]]
    runpy.run_path("launch/distill.py", run_name="__main__")
    """
)


HOLDER = textwrap.dedent(
    """
    # launch/distill.py held after step {hold_at}'s row of log.csv until the process has a stop
    # request, so the test's signal lands there and the run cannot end first (the deadline
    # only lets a lost signal fail the test instead of hanging it).
    import os, runpy, sys, time
    sys.path.insert(0, {repo!r})
    import distill.logs
    import teachers.runtime.preempt as preempt
    listen, write = preempt.StopRequest.listen, distill.logs.StepLog.write
    requests = []
    def listen_and_keep(self):
        requests.append(self)
        return listen(self)
    def write_then_hold(self, step, values):
        write(self, step, values)
        deadline = time.monotonic() + 300
        while step == {hold_at} and not requests[0].requested and time.monotonic() < deadline:
            time.sleep(0.02)
    preempt.StopRequest.listen = listen_and_keep
    distill.logs.StepLog.write = write_then_hold
    sys.argv = ["launch/distill.py", *sys.argv[1:]]
    runpy.run_path("launch/distill.py", run_name="__main__")
    """
)


def _held(args: list[str], hold_at: int) -> subprocess.Popen:
    """launch/distill.py with `args`, held after step `hold_at` until it is signalled."""
    script = HOLDER.format(repo=str(REPO), hold_at=hold_at)
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=unplaced_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_rows(proc: subprocess.Popen, out: Path, rows: int) -> None:
    deadline = time.monotonic() + 300  # only a hang stops here
    while not ((out / "log.csv").exists() and len(_log(out)) >= rows):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("".join(proc.communicate(timeout=60))[-3000:])
        time.sleep(0.05)


def _weights(out):
    return load_sam(out / "student.pt").image_encoder.state_dict()


def _assert_same_run(a, b):
    wa, wb = _weights(a), _weights(b)
    for key in wb:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=1e-5)
    assert [int(r["step"]) for r in _log(a)] == [int(r["step"]) for r in _log(b)]


def test_sigusr1_saves_at_that_step_exits_75_and_resume_ends_like_an_uninterrupted_run(
    cache, tmp_path
):
    """One process with 2 loader workers (which ignore the signal and must still end with the
    process), the signal sent from outside while the run is held after step 3: the request is
    seen at the end of step 4."""
    args = ["--shards", str(cache), "--steps", "8", "--batch-size", "2", *BASE, "--workers", "2"]
    args += ["--checkpoint-every", "1000"]  # any checkpoint before the end comes from the signal
    out = tmp_path / "stopped"
    proc = _held([*args, "--out", str(out)], hold_at=3)
    _wait_for_rows(proc, out, 3)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=300)  # a generous deadline: a hang, not a clock
    assert proc.returncode == 75, stdout[-2000:] + stderr[-2000:]
    stopped = int(re.search(r"stopped at step (\d+) of 8 on SIGUSR1", stderr)[1])
    assert stopped == 4
    assert (out / "checkpoints" / "latest").read_text() == f"step{stopped:08d}"
    assert [int(r["step"]) for r in _log(out)] == list(range(1, stopped + 1))
    assert not (out / "student.pt").exists()

    resumed = _run(*args, "--out", str(out), "--resume", "auto")
    assert f"at step {stopped}" in resumed.stdout
    _run(*args, "--out", str(tmp_path / "straight"))
    _assert_same_run(out, tmp_path / "straight")


def test_sigusr1_to_one_of_two_deepspeed_ranks_stops_both_at_the_same_step(cache, tmp_path):
    """Rank 0 signals itself after step 5: both ranks agree to stop after step 6, save it (not a
    multiple of --checkpoint-every 4), and exit with the requeue status; a second signal while
    saving changes nothing."""
    args = ["--shards", str(cache), "--steps", "10", "--batch-size", "4", *BASE]
    args += ["--checkpoint-every", "4", "--zero-stage", "1"]
    wrapper = tmp_path / "signaller.py"
    wrapper.write_text(SIGNALLER.format(repo=str(REPO), signal_at=5))
    out = tmp_path / "stopped"
    env = unplaced_env()
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", "29733", str(wrapper), *args]
    result = subprocess.run(
        [*cmd, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 75, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "rank 0: stopped at step 6 of 10 on SIGUSR1" in log
    assert "rank 1: stopped at step 6 of 10 on a signal to another process" in log
    assert (out / "checkpoints" / "latest").read_text() == "step00000006"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == [
        "step00000004",
        "step00000006",
    ]

    _run(*args, "--out", str(out), "--resume", "auto", launcher="deepspeed")
    _run(*args, "--out", str(tmp_path / "straight"), launcher="deepspeed")
    _assert_same_run(out, tmp_path / "straight")


@pytest.fixture(scope="module")
def phase_one(cache, tmp_path_factory):
    """A phase-1 dfa_t student (6 steps) for phase 2 to start from."""
    out = tmp_path_factory.mktemp("phase1") / "run"
    _run("--shards", str(cache), "--out", str(out), "--steps", "6", "--batch-size", "4", *BASE)
    return out / "student.pt"


def _phase_two(cache, phase_one, steps):
    """Phase 2 with the decoder training too and a refinement round, so the checkpoint must
    carry the student's decoder and the clicks must replay."""
    return ["--shards", str(cache), "--steps", str(steps), "--batch-size", "4", *BASE] + [
        "--phase", "decoder", "--init", str(phase_one), "--tune", "both", "--max-prompts", "2",
        "--decode-iters", "1", "--lr", "1e-3", "--student", "dfa_t",
    ]  # fmt: skip


def _full_model(out):
    sam = load_sam(out / "student.pt")
    return {**sam.image_encoder.state_dict(), **sam.mask_decoder.state_dict(prefix="decoder.")}


def test_phase_two_sigkill_then_resume_auto_ends_like_an_uninterrupted_run(
    cache, phase_one, tmp_path
):
    args = [*_phase_two(cache, phase_one, 8), "--checkpoint-every", "4"]
    killer = killer_script("launch/distill.py", kill_at=6)
    killed = _run(*args, "--out", str(tmp_path / "killed"), script=killer, check=False)
    assert killed.returncode == -9
    resumed = _run(*args, "--out", str(tmp_path / "killed"), "--resume", "auto")
    assert "at step 4" in resumed.stdout
    _run(*args, "--out", str(tmp_path / "straight"))
    a, b = _full_model(tmp_path / "killed"), _full_model(tmp_path / "straight")
    assert read_export_meta(tmp_path / "straight" / "student.pt")["mask_decoder"] == "student"
    initial = load_sam(phase_one).mask_decoder.state_dict(prefix="decoder.")
    assert any(not torch.equal(b[k], initial[k]) for k in initial)  # the decoder trained
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    killed_log, straight_log = _log(tmp_path / "killed"), _log(tmp_path / "straight")
    assert [int(r["step"]) for r in killed_log] == list(range(1, 9))
    for column in ("loss_total", "loss_mask"):
        np.testing.assert_allclose(
            [float(r[column]) for r in killed_log],
            [float(r[column]) for r in straight_log],
            rtol=1e-5,
        )
    assert [r["num_unprompted"] for r in killed_log] == [r["num_unprompted"] for r in straight_log]


def test_phase_two_one_and_two_processes_give_the_same_losses(cache, phase_one, tmp_path):
    args = [*_phase_two(cache, phase_one, 4), "--micro-batch-size", "2"]
    _run(*args, "--out", str(tmp_path / "one"))
    _run(*args, "--out", str(tmp_path / "two"), launcher="deepspeed")
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    for column in ("loss_total", "loss_mask"):
        a = np.array([float(r[column]) for r in one])
        b = np.array([float(r[column]) for r in two])
        np.testing.assert_allclose(a, b, rtol=1e-5)
    assert np.isfinite(a).all() and a.min() > 0


def test_phase_two_counts_images_without_annotations_and_trains_on_the_rest(phase_one, tmp_path):
    """The documented rule: an image without a usable annotation adds no mask loss and is
    counted in log.csv (`num_unprompted`, cumulative)."""
    coco = tmp_path / "coco"
    make_coco(coco, num_images=4, seed=3)
    ann_file = coco / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    bare = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != bare]
    ann_file.write_text(json.dumps(data))
    teacher = load_teacher("vit_tiny", taps=(1, 3))
    write_cache(teacher, plan_cache(str(coco), 4), tmp_path / "cache", progress=False)
    args = ["--shards", str(tmp_path / "cache"), "--steps", "2", "--batch-size", "4", *BASE]
    args += ["--phase", "decoder", "--init", str(phase_one), "--max-prompts", "2"]
    _run(*args, "--out", str(tmp_path / "run"))
    rows = _log(tmp_path / "run")
    # Two passes over the 4 images (one step each): the bare image twice, the rest trained on.
    assert [int(r["num_unprompted"]) for r in rows] == [1, 2]
    assert all(float(r["loss_mask"]) > 0 for r in rows)


def test_ctrl_c_saves_and_leaves_like_sigterm_without_a_traceback(cache, tmp_path):
    args = ["--shards", str(cache), "--steps", "6", "--batch-size", "2", *BASE]
    out = tmp_path / "interrupted"
    proc = _held([*args, "--checkpoint-every", "1000", "--out", str(out)], hold_at=2)
    _wait_for_rows(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)  # a generous deadline: a hang, not a clock
    assert proc.returncode == 75, stdout[-2000:] + stderr[-2000:]
    assert "stopped at step 3 of 6 on SIGINT" in stderr, stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text() == "step00000003"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


def test_a_second_ctrl_c_leaves_at_once() -> None:
    from teachers.runtime.preempt import LEAVE_NOW_EXIT, StopRequest

    stop = StopRequest()
    stop._record(signal.SIGINT, None)
    assert stop.signal == "SIGINT"
    with pytest.raises(SystemExit) as left:
        stop._record(signal.SIGINT, None)
    assert left.value.code == LEAVE_NOW_EXIT
    again = StopRequest()
    again._record(signal.SIGTERM, None)
    again._record(signal.SIGTERM, None)  # a repeated SIGTERM only records (SLURM may resend)
    assert again.signal == "SIGTERM"
    with pytest.raises(SystemExit):  # Ctrl-C while a requested save runs: leave now
        again._record(signal.SIGINT, None)
