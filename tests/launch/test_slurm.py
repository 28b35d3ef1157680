"""The SLURM batch scripts (launch/slurm/), submitted to a real one-node cluster (see conftest.py).

On tiny generated data: caching with 2 tasks, distillation with 2 tasks, evaluation with 2 tasks,
then a distillation cancelled midway and resubmitted, and one requeued (as the script does near
its time limit), both of which must resume from their checkpoint.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from pathlib import Path

import pytest

from eval.synthetic import make_coco
from students.export import read_export_meta
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


def completed(slurm, work: Path, name: str, job_id: str, timeout: float = 240) -> str:
    """Wait for the job; assert it succeeded; its log."""
    job = slurm.wait(job_id, timeout=timeout)
    log = log_of(work, name, job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (
        f"job {job_id}: {job['JobState']} exit {job['ExitCode']}\n{log[-4000:]}\n{slurm.diagnostics()}"
    )
    return log


def logged_steps(run: Path) -> list[int]:
    with open(run / "log.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def wait_for_checkpoint(slurm, run: Path, job_id: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "checkpoints" / "latest").exists():
        state = slurm.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job_id} {state} before its first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint in {run} after {timeout} s"
        time.sleep(0.2)


def wait_for_log(slurm, work: Path, job_id: str, text: str, timeout: float = 120) -> None:
    path = work / "logs" / f"sam-distill-{job_id}.out"
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        state = slurm.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job_id} {state} before logging {text!r}"
        assert time.monotonic() < deadline, f"{path} lacks {text!r} after {timeout} s"
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


def _long_run(work: Path, cache, name: str) -> tuple[Path, dict, list[str]]:
    """A 60-step run with a checkpoint every 3 steps: (run folder, environment, arguments)."""
    folder = work / name
    env = dict(SHARDS=str(cache[0]), OUT=str(folder), STUDENT="dfa_t", TEACHER="vit_tiny")
    env |= dict(STEPS="60", BATCH_SIZE="2")
    return folder, env, [*DISTILL_ARGS, "--checkpoint-every", "3"]


def test_cancelled_distill_job_resumes_when_resubmitted(slurm, work, cache):
    folder, env, args = _long_run(work, cache, "cancelled")
    first = submit(slurm, work, "distill.sbatch", env, ["--ntasks", "2"], args)
    wait_for_checkpoint(slurm, folder, first)
    slurm.run("scancel", first)
    assert slurm.wait(first)["JobState"] == "CANCELLED"
    assert not (folder / "student.pt").exists()

    second = submit(slurm, work, "distill.sbatch", env, ["--ntasks", "2"], args)
    log = completed(slurm, work, "sam-distill", second)
    found = RESUMED.search(log)
    assert found, log
    assert found[1] == str(folder) and int(found[2]) == int(found[3])
    assert 0 < int(found[3]) < 60
    assert logged_steps(folder) == list(range(1, 61))
    assert read_export_meta(folder / "student.pt")["step"] == 60
    assert "resumed from" not in log_of(work, "sam-distill", first)


def test_requeued_distill_job_resumes_under_the_same_job_id(slurm, work, cache):
    """USR1 to the batch shell is what `#SBATCH --signal=B:USR1@300` sends before the time
    limit: with a new checkpoint the script requeues its job, which restarts, appends to its log
    and resumes; without one (nothing to keep) it goes on running instead."""
    folder, env, args = _long_run(work, cache, "requeued")
    job_id = submit(slurm, work, "distill.sbatch", env, ["--ntasks", "2"], args)
    wait_for_log(slurm, work, job_id, f"job {job_id} (restart 0)")  # printed once USR1 is trapped
    assert not (folder / "checkpoints" / "latest").exists()
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    wait_for_log(slurm, work, job_id, "no checkpoint since the start, not requeueing")

    wait_for_checkpoint(slurm, folder, job_id)
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    job = slurm.wait(job_id, until=("PENDING", *FINISHED))
    assert (job["JobState"], job["Restarts"]) == ("PENDING", "1"), job
    # SLURM holds a requeued job for about two minutes (its launch credential's lifetime) and we
    # wait it out: releasing it early races slurmd, which refuses to relaunch a job id it has
    # just killed ("already killed, do not launch batch job").
    log = completed(slurm, work, "sam-distill", job_id, timeout=420)
    assert f"requeueing job {job_id}" in log
    assert f"job {job_id} (restart 0)" in log and f"job {job_id} (restart 1)" in log, log
    found = RESUMED.search(log)
    assert found and 0 < int(found[3]) < 60, log
    assert logged_steps(folder) == list(range(1, 61))


def test_job_outside_the_repository_fails_with_a_message(slurm, work):
    env = job_env(SHARDS="x", OUT="y")
    env["SAM_DISTILL_ROOT"] = str(work)  # not a checkout
    job_id = slurm.sbatch(SLURM_DIR / "distill.sbatch", env=env, cwd=work)
    job = slurm.wait(job_id, timeout=60)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0")
    assert "submit from the sam-distill repository or set SAM_DISTILL_ROOT" in log_of(
        work, "sam-distill", job_id
    )
