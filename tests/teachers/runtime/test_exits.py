"""The one guard of every entry point (`teachers.runtime.exits.exit_status`)."""

from __future__ import annotations

from teachers.runtime.exits import USER_ERROR, exit_status
from teachers.runtime.preempt import REQUEUE_EXIT, Preempted


def _raise(err: Exception):
    def run():
        raise err

    return run


def test_outcomes_map_to_exit_statuses(capsys):
    assert exit_status(lambda: None) == 0 and exit_status(lambda: 1) == 1
    assert exit_status(_raise(ValueError("--steps must be at least 1"))) == USER_ERROR == 2
    assert capsys.readouterr().err == "error: --steps must be at least 1\n"
    assert exit_status(_raise(FileNotFoundError("checkpoint not found: x.pt"))) == 2
    assert exit_status(_raise(Preempted("rank 0: stopped at step 3"))) == REQUEUE_EXIT == 75
    assert "stopped at step 3" in capsys.readouterr().err


def test_other_errors_are_not_user_mistakes():
    try:
        exit_status(_raise(RuntimeError("a bug")))
    except RuntimeError as err:
        assert str(err) == "a bug"
    else:
        raise AssertionError("a RuntimeError must keep its traceback")
