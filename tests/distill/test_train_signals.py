"""The distillation entry point stopped by signals, run for real: SIGUSR1 to one process or
to one of two DeepSpeed ranks, Ctrl-C, each saving where it stopped and resuming to the end an
uninterrupted run reaches."""

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, unplaced_env
from tests.distill.runs import BASE, assert_same_encoder, read_log, run_distill

pytestmark = pytest.mark.slow


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
    while not ((out / "log.csv").exists() and len(read_log(out)) >= rows):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("".join(proc.communicate(timeout=60))[-3000:])
        time.sleep(0.05)


def _assert_same_run(a, b):
    assert_same_encoder(a, b)
    assert [int(r["step"]) for r in read_log(a)] == [int(r["step"]) for r in read_log(b)]


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
    assert [int(r["step"]) for r in read_log(out)] == list(range(1, stopped + 1))
    assert not (out / "student.pt").exists()

    resumed = run_distill(*args, "--out", str(out), "--resume", "auto")
    assert f"at step {stopped}" in resumed.stdout
    run_distill(*args, "--out", str(tmp_path / "straight"))
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
    port = str(free_port())
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", port, str(wrapper), *args]
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

    run_distill(*args, "--out", str(out), "--resume", "auto", launcher="deepspeed")
    run_distill(*args, "--out", str(tmp_path / "straight"), launcher="deepspeed")
    _assert_same_run(out, tmp_path / "straight")


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
