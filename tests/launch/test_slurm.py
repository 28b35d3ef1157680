"""The SLURM batch scripts (launch/slurm/), submitted to a real one-node cluster (see conftest.py).

On tiny generated data: caching with 2 tasks, distillation with 2 tasks, evaluation with 2 tasks,
then a distillation cancelled midway and resubmitted, which must resume from its checkpoint, and
a distillation and a caching job sent USR1 mid-run (as SLURM does near the time limit), which
must save, requeue themselves and end as if never stopped; one signalled before it saved
anything must not requeue.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from eval.scenes.domain import make_domain
from eval.scenes.synthetic import make_coco
from students.export import read_export_meta
from students.load import load_sam
from teachers.cache import plan_cache
from tests.conftest import REPO
from tests.launch.slurm_cluster import FINISHED

pytestmark = pytest.mark.slow

SLURM_DIR = REPO / "launch" / "slurm"
DISTILL_ARGS = ["--img-size", "256", "--workers", "0", "--device", "cpu", "--log-every", "10"]
RESUMED = re.compile(r"rank 0: resumed from (\S+)/checkpoints/step(\d+) at step (\d+)")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The submit directory: a COCO-format dataset and the logs/ folder the scripts write to."""
    root = tmp_path_factory.mktemp("slurm")
    make_coco(root / "coco", num_images=8, seed=0)
    (root / "logs").mkdir()
    return root


def job_env(**values: str) -> dict[str, str]:
    env = {"SAM_DISTILL_ROOT": str(REPO), **values}
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        env["PYTHON"] = sys.executable  # else the scripts' default, the repository's .venv
    return env


def submit(slurm, work: Path, script: str, env: dict, options=(), args=()) -> str:
    return slurm.sbatch(SLURM_DIR / script, options, args, env=job_env(**env), cwd=work)


def log_of(work: Path, name: str, job_id: str) -> str:
    path = work / "logs" / f"{name}-{job_id}.out"
    assert path.is_file(), f"no job log {path}: {sorted(p.name for p in (work / 'logs').iterdir())}"
    return path.read_text()


def completed(slurm, work: Path, name: str, job_id: str, timeout: float = 600) -> str:
    """Wait for the job (the deadline only catches a hang); assert it succeeded; its log."""
    job = slurm.wait(job_id, timeout=timeout)
    log = log_of(work, name, job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (
        f"job {job_id}: {job['JobState']} exit {job['ExitCode']}\n{log[-4000:]}\n{slurm.diagnostics()}"
    )
    return log


def logged_steps(run: Path) -> list[int]:
    with open(run / "log.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def wait_until(slurm, job_id: str, what: str, check, timeout: float = 300) -> None:
    """Poll `check` until it holds; the deadline only catches a job that never gets there."""
    deadline = time.monotonic() + timeout
    while not check():
        state = slurm.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job_id} {state} before {what}"
        assert time.monotonic() < deadline, f"job {job_id}: no {what} after {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cache(slurm, work) -> tuple[Path, str]:
    """A vit_tiny cache of the 8 images written by cache_teacher.sbatch with 2 tasks; (folder,
    job id). The submit environment carries a stale single-process placement, which the script
    must ignore."""
    env = dict(IMAGES=str(work / "coco"), OUT=str(work / "cache"), TEACHER="vit_tiny")
    env |= dict(SAMPLES_PER_SHARD="2", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    options = ["--ntasks", "2", "--cpus-per-task", "1"]
    job_id = submit(slurm, work, "cache_teacher.sbatch", env, options, ["--workers", "0"])
    completed(slurm, work, "sam-cache", job_id)
    return work / "cache", job_id


@pytest.fixture(scope="module")
def run(slurm, work, cache) -> tuple[Path, str]:
    """A 6-step dfa_t distillation by distill.sbatch with 2 tasks; (run folder, job id)."""
    env = dict(SHARDS=str(cache[0]), OUT=str(work / "run"), STUDENT="dfa_t", TEACHER="vit_tiny")
    env |= dict(STEPS="6", BATCH_SIZE="2")
    args = [*DISTILL_ARGS, "--checkpoint-every", "3"]
    job_id = submit(slurm, work, "distill.sbatch", env, ["--ntasks", "2"], args)
    completed(slurm, work, "sam-distill", job_id)
    return work / "run", job_id


def test_cache_job_writes_every_sample_once_from_two_tasks(work, cache):
    folder, job_id = cache
    log = log_of(work, "sam-cache", job_id)
    assert "2 tasks" in log
    assert "rank 0/2:" in log and "rank 1/2:" in log, log
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 8
    assert len(manifest["shards"]) == 4
    keys = [
        k
        for i in range(4)
        for k in json.loads((folder / f"shard-{i:06d}.json").read_text())["keys"]
    ]
    assert len(keys) == len(set(keys)) == 8
    assert not list(folder.glob("*.partial"))


def test_distill_job_trains_on_two_tasks_and_exports(slurm, work, run):
    folder, job_id = run
    log = log_of(work, "sam-distill", job_id)
    assert f"2 tasks, master {slurm.node}:{20000 + int(job_id) % 10000}" in log, log
    assert "resumed from" not in log
    assert "exported" in log and "step 6/6" in log
    assert logged_steps(folder) == [1, 2, 3, 4, 5, 6]
    assert (folder / "checkpoints" / "latest").read_text().strip() == "step00000006"
    meta = read_export_meta(folder / "student.pt")
    assert meta["step"] == 6 and meta["student"]["name"] == "dfa_t"


def test_adapt_job_adapts_the_distilled_student_on_two_tasks(slurm, work, run):
    """The pipeline's next stage on the cluster: adapt.sbatch on the student distill.sbatch made."""
    data = make_domain(work / "domain", num_train=4, num_val=2, size=64)
    out = work / "adapt"
    env = dict(CKPT=str(run[0] / "student.pt"), DATA=str(data), OUT=str(out), METHOD="conv_lora")
    env |= dict(STEPS="4", BATCH_SIZE="2")
    args = ["--workers", "0", "--device", "cpu", "--val-every", "2"]
    job_id = submit(slurm, work, "adapt.sbatch", env, ["--ntasks", "2"], args)
    log = completed(slurm, work, "sam-adapt", job_id)
    assert f"2 tasks, master {slurm.node}:{20000 + int(job_id) % 10000}" in log, log
    assert "before adaptation: val IoU" in log and "step 4/4" in log and "exported" in log
    assert logged_steps(out) == [1, 2, 3, 4]
    sam = load_sam(out / "adapted.pt")
    assert sam.image_encoder.adapter_name == "conv_lora"


def test_eval_job_merges_the_parts_of_two_tasks(slurm, work, run):
    out = work / "eval" / "coco.json"
    env = dict(CKPT=str(run[0] / "student.pt"), COCO_ROOT=str(work / "coco"), OUT=str(out))
    options = ["--ntasks", "2", "--cpus-per-task", "1"]
    job_id = submit(slurm, work, "eval.sbatch", env, options, ["--device", "cpu"])
    log = completed(slurm, work, "sam-eval", job_id)
    assert "rank 0/2:" in log and "rank 1/2:" in log, log
    gt = json.loads((work / "coco" / "annotations" / "instances_val2017.json").read_text())
    expected = sorted(a["id"] for a in gt["annotations"] if a["area"] >= 1)  # crowd included
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 2
    assert (summary["num_images"], summary["num_instances"]) == (8, len(expected))
    lines = Path(summary["instances_file"]).read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == expected
    assert all(out.with_name(f"coco.json.rank{r}-of-2.jsonl").is_file() for r in range(2))


# --- save and leave on a signal: scancel, and USR1 (the time-limit warning) requeued ----------

HELD = textwrap.dedent(
    """
    # PYTHON for the batch scripts: the entry point in argv[1], held at one point until its
    # process has a stop request, so that a test signals it there and the job cannot run past
    # it first: HOLD_AT_STEP=N holds distillation after step N's row of log.csv (rank 0 writes
    # it; the other rank waits in the next step's collective), HOLD_AFTER=shard or sample holds
    # each caching task after its first finished shard or its first written sample. Only a
    # job's first run holds (a requeued run is not signalled again). A hold that sees no
    # signal in HOLD_DEADLINE seconds lets go, so a lost signal fails a test instead of hanging
    # it. The patches go in once the entry point listens for signals (its first lines, before
    # torch loads), so that importing what they patch does not widen the start-up window in
    # which a signal kills.
    import os, runpy, sys, time
    sys.path.insert(0, {repo!r})
    import teachers.runtime.preempt
    first_run = os.environ.get("SLURM_RESTART_COUNT", "0") == "0"

    def hold(request, where):
        print("holding", where, "until a stop request", flush=True)
        deadline = time.monotonic() + float(os.environ.get("HOLD_DEADLINE", "600"))
        while not request.requested and time.monotonic() < deadline:
            time.sleep(0.05)

    def hold_distill(request):
        import distill.logs as logs
        at = int(os.environ.get("HOLD_AT_STEP", "0"))
        write_row = logs.StepLog.write
        def write_row_then_hold(self, step, values):
            write_row(self, step, values)
            if step == at:
                hold(request, "after step %d" % step)
        logs.StepLog.write = write_row_then_hold

    def hold_cache(request):
        import teachers.cache as cache
        where = os.environ.get("HOLD_AFTER", "")
        write, finish = cache._ShardWriter.write, cache._ShardWriter.finish
        held = []
        def once(what):
            if where == what and not held:
                held.append(what)
                hold(request, "after the first " + what)
        def write_then_hold(self, sample):
            write(self, sample)
            once("sample")
        def finish_then_hold(self):
            finish(self)
            once("shard")
        cache._ShardWriter.write, cache._ShardWriter.finish = write_then_hold, finish_then_hold

    listen = teachers.runtime.preempt.StopRequest.listen
    def listen_then_hold(self):
        listening = listen(self)
        if first_run:
            (hold_distill if sys.argv[0].endswith("distill.py") else hold_cache)(self)
        return listening
    teachers.runtime.preempt.StopRequest.listen = listen_then_hold
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)
STOPPED = re.compile(r"rank 0: stopped at step (\d+) of (\d+)")
REQUEUE_STEPS = 8  # the signal comes at step 3: nothing races it, so a short run does


@pytest.fixture(scope="module")
def held_python(work) -> str:
    """An executable for PYTHON that runs the entry point through HELD."""
    (work / "held.py").write_text(HELD.format(repo=str(REPO)))
    wrapper = work / "python-held"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {work / "held.py"} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def test_cancelled_distill_job_resumes_when_resubmitted(slurm, work, cache, held_python):
    """scancel while the job is held after step 4 (its step-3 checkpoint written), so the run
    cannot end first; resubmitted, the same OUT resumes from the newest checkpoint."""
    folder = work / "cancelled"
    env = dict(SHARDS=str(cache[0]), OUT=str(folder), STUDENT="dfa_t", TEACHER="vit_tiny")
    env |= dict(STEPS="8", BATCH_SIZE="2")
    args = [*DISTILL_ARGS, "--checkpoint-every", "3"]
    held = env | dict(PYTHON=held_python, HOLD_AT_STEP="4")
    first = submit(slurm, work, "distill.sbatch", held, ["--ntasks", "2"], args)
    wait_until(slurm, first, "a checkpoint", (folder / "checkpoints" / "latest").exists)
    slurm.run("scancel", first)
    job = slurm.wait(first)
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0"), job  # cancelled stays so
    assert not (folder / "student.pt").exists()
    assert "requeueing left to SLURM" in log_of(work, "sam-distill", first)

    second = submit(slurm, work, "distill.sbatch", env, ["--ntasks", "2"], args)
    log = completed(slurm, work, "sam-distill", second)
    found = RESUMED.search(log)
    assert found, log
    assert found[1] == str(folder) and int(found[2]) == int(found[3])
    # 3: the periodic checkpoint (if KillWait ran out before the stop's save), else the step
    # the stop request was agreed on (4 or 5)
    assert 3 <= int(found[3]) < 8
    assert logged_steps(folder) == list(range(1, 9))
    assert read_export_meta(folder / "student.pt")["step"] == 8
    assert "resumed from" not in log_of(work, "sam-distill", first)


def usr1_until_requeued(slurm, job_id: str) -> dict[str, str]:
    """Send USR1 to the batch shell, as `#SBATCH --signal=B:USR1@300` does before the time
    limit; the job should save, requeue itself and wait (PENDING) for its next run."""
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    job = slurm.wait(job_id, until=("PENDING", *FINISHED), timeout=300)
    assert (job["JobState"], job["Restarts"]) == ("PENDING", "1"), job
    return job


def cache_keys(folder: Path) -> list[list[str]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [
        json.loads((folder / f"shard-{i:06d}.json").read_text())["keys"]
        for i in range(manifest["num_shards"])
    ]


def _distill_env(cache, folder: Path) -> dict[str, str]:
    env = dict(SHARDS=str(cache[0]), OUT=str(folder), STUDENT="dfa_t", TEACHER="vit_tiny")
    return env | dict(STEPS=str(REQUEUE_STEPS), BATCH_SIZE="2")


# A checkpoint can only come from the signal.
REQUEUE_ARGS = [*DISTILL_ARGS, "--checkpoint-every", "1000"]


def _stop_distill(slurm, work: Path, cache, held_python: str) -> dict:
    """Distillation with 2 tasks, held after step 3 until USR1 comes."""
    folder = work / "requeued"
    env = _distill_env(cache, folder) | dict(PYTHON=held_python, HOLD_AT_STEP="3")
    job_id = submit(slurm, work, "distill.sbatch", env, ["--ntasks", "2"], REQUEUE_ARGS)
    log_csv = folder / "log.csv"
    rows = lambda: log_csv.read_text().count("\n") - 1 if log_csv.exists() else 0  # noqa: E731
    wait_until(slurm, job_id, "3 rows in log.csv", lambda: rows() >= 3)
    usr1_until_requeued(slurm, job_id)
    return dict(
        job_id=job_id,
        folder=folder,
        latest=(folder / "checkpoints" / "latest").read_text().strip(),
        steps=logged_steps(folder),
        log=log_of(work, "sam-distill", job_id),
    )


def _cache_env(images: Path, folder: Path, **values: str) -> dict[str, str]:
    return dict(IMAGES=str(images), OUT=str(folder), TEACHER="vit_tiny", BATCH_SIZE="2") | values


CACHE_OPTIONS = ["--ntasks", "2", "--cpus-per-task", "1"]


def _stop_cache(slurm, work: Path, held_python: str) -> dict:
    """Caching with 2 tasks, 16 images in shards of 3 and batches of 2, each task held after its
    first finished shard; USR1 once a shard is there: each task then drops the shard its batch
    began."""
    make_coco(work / "coco16", num_images=16, seed=1)
    folder = work / "cache-requeued"
    env = _cache_env(work / "coco16", folder, SAMPLES_PER_SHARD="3")
    env |= dict(PYTHON=held_python, HOLD_AFTER="shard")
    job_id = submit(slurm, work, "cache_teacher.sbatch", env, CACHE_OPTIONS, ["--workers", "0"])
    wait_until(slurm, job_id, "a finished shard", lambda: any(folder.glob("shard-*.json")))
    usr1_until_requeued(slurm, job_id)
    return dict(
        job_id=job_id,
        folder=folder,
        manifest=json.loads((folder / "manifest.json").read_text()),
        log=log_of(work, "sam-cache", job_id),
    )


def _stop_cache_before_any_shard(slurm, work: Path, held_python: str) -> dict:
    """Caching in shards of 4, each task held after its first sample: USR1 once both say so."""
    folder = work / "cache-none"
    env = _cache_env(work / "coco", folder, SAMPLES_PER_SHARD="4")
    env |= dict(PYTHON=held_python, HOLD_AFTER="sample")
    job_id = submit(slurm, work, "cache_teacher.sbatch", env, CACHE_OPTIONS, ["--workers", "0"])
    log = work / "logs" / f"sam-cache-{job_id}.out"

    def both_held() -> bool:
        return log.exists() and log.read_text().count("holding after the first sample") == 2

    wait_until(slurm, job_id, "both tasks held after a sample", both_held)
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    return dict(job_id=job_id, folder=folder, job=slurm.wait(job_id, timeout=300))


@pytest.fixture(scope="module")
def preempted(slurm, work, cache, held_python) -> dict:
    """The jobs stopped by USR1, submitted together so that SLURM's holds of the requeued ones
    (their launch credential's lifetime: cred_expire, 15 s in this cluster, 120 s by default)
    overlap and the other jobs run meanwhile. Releasing a requeued job early races slurmd,
    which refuses to relaunch a job id it has just killed ("already killed, do not launch batch
    job"), so the tests wait it out.
    "reference" is the uninterrupted distillation, through the same script."""
    jobs = dict(distill=_stop_distill(slurm, work, cache, held_python))
    jobs["cache"] = _stop_cache(slurm, work, held_python)
    jobs["cache_none"] = _stop_cache_before_any_shard(slurm, work, held_python)
    folder = work / "straight"
    env = _distill_env(cache, folder)
    job_id = submit(slurm, work, "distill.sbatch", env, ["--ntasks", "2"], REQUEUE_ARGS)
    jobs["reference"] = dict(job_id=job_id, folder=folder)
    return jobs


def test_requeued_distill_job_resumes_and_ends_with_the_uninterrupted_weights(
    slurm, work, preempted
):
    """USR1 to the batch shell reaches both tasks, which checkpoint at the step they agree on
    and exit 75; the script requeues the job, which restarts under the same id, appends to its
    log, resumes from that checkpoint and ends as if it had never stopped."""
    first = preempted["distill"]
    job_id, folder = first["job_id"], first["folder"]
    found = STOPPED.search(first["log"])
    assert found and int(found[2]) == REQUEUE_STEPS, first["log"]
    stopped = int(found[1])
    # Held after step 3 until the signal, rank 0's request rides on step 4's collective.
    assert stopped == 4
    assert first["latest"] == f"step{stopped:08d}"  # the only checkpoint: the signal's
    assert first["steps"] == list(range(1, stopped + 1))
    assert "USR1 received: asking the tasks to save and stop" in first["log"]
    assert f"requeueing job {job_id}" in first["log"]

    log = completed(slurm, work, "sam-distill", job_id, timeout=900)
    assert f"job {job_id} (restart 0)" in log and f"job {job_id} (restart 1)" in log, log
    found = RESUMED.search(log)
    assert found and found[1] == str(folder), log
    assert int(found[2]) == int(found[3]) == stopped
    assert logged_steps(folder) == list(range(1, REQUEUE_STEPS + 1))
    assert read_export_meta(folder / "student.pt")["step"] == REQUEUE_STEPS

    reference = preempted["reference"]
    plain = completed(slurm, work, "sam-distill", reference["job_id"], timeout=900)
    assert "resumed from" not in plain and "stopped at step" not in plain
    a = load_sam(folder / "student.pt").image_encoder.state_dict()
    b = load_sam(reference["folder"] / "student.pt").image_encoder.state_dict()
    assert a.keys() == b.keys()
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_requeued_cache_job_completes_with_each_input_once(slurm, work, preempted):
    first = preempted["cache"]
    job_id, folder = first["job_id"], first["folder"]
    assert "dropped the unfinished" in first["log"] and "which a rerun redoes" in first["log"]
    assert f"requeueing job {job_id}" in first["log"]
    assert 1 <= len(first["manifest"]["shards"]) < 6 and not first["manifest"]["complete"]

    log = completed(slurm, work, "sam-cache", job_id, timeout=900)
    assert f"job {job_id} (restart 1)" in log, log
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_shards"] == 6 and manifest["num_samples"] == 16
    assert not list(folder.glob("*.partial"))
    keys = [k for shard in cache_keys(folder) for k in shard]
    assert len(keys) == len(set(keys)) == 16
    # An uninterrupted run writes the plan's shards, input for input.
    plan = plan_cache(str(work / "coco16"), 3)
    assert cache_keys(folder) == [[i.key for i in plan.shard_items(k)] for k in range(6)]


def test_signal_before_any_progress_is_not_requeued(slurm, work, preempted):
    """Exit 75 with nothing saved: requeueing would only loop, so the job fails with 75."""
    none = preempted["cache_none"]
    job, folder = none["job"], none["folder"]
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "75:0", "0"), job
    log = log_of(work, "sam-cache", none["job_id"])
    assert "stopped after finishing 0 shard(s)" in log, log
    assert f"no progress saved since the start, not requeueing job {none['job_id']}" in log
    assert not list(folder.glob("shard-*")), sorted(p.name for p in folder.iterdir())
    assert json.loads((folder / "manifest.json").read_text())["shards"] == []


def test_job_outside_the_repository_fails_with_a_message(slurm, work):
    env = job_env(SHARDS="x", OUT="y")
    env["SAM_DISTILL_ROOT"] = str(work)  # not a checkout
    job_id = slurm.sbatch(SLURM_DIR / "distill.sbatch", env=env, cwd=work)
    job = slurm.wait(job_id, timeout=300)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0")
    assert "submit from the sam-distill repository or set SAM_DISTILL_ROOT" in log_of(
        work, "sam-distill", job_id
    )
