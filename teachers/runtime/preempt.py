"""Save and leave on a signal: SLURM's time-limit warning (`SIGUSR1`), preemption (`SIGTERM`)
and Ctrl-C (`SIGINT`, which does what SIGTERM does; a second Ctrl-C leaves at once).

A job holds a `StopRequest` while it runs. The handler only records that a signal came, so a
second signal while the job is saving does nothing but record again; the job looks at the
request at its own safe points (the end of a training step, the end of a batch of the cache
writer), saves there, and raises `Preempted`. Entry points turn that into `REQUEUE_EXIT`, which
the SLURM batch scripts read as "progress is saved: requeue me".

Part of the ground floor (`teachers.runtime`, standard library only): the entry scripts create
their `StopRequest` before the slow imports, so a signal that comes while torch loads is recorded
instead of killing the process (the default action of both signals is to terminate).
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

REQUEUE_EXIT = 75
"""Exit status of a job that saved its progress on a signal and wants to be requeued
(`EX_TEMPFAIL` of sysexits.h: a temporary failure, try again)."""

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
LEAVE_NOW_EXIT = 130  # the shell's status for a process ended by SIGINT


class Preempted(Exception):  # noqa: N818 (an outcome, not an error)
    """Raised by a job that saved its progress after a stop request."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class StopRequest:
    """Records `SIGUSR1`, `SIGTERM` and `SIGINT` while listening; `.signal` names the first one
    received. A `SIGINT` after a stop request (Ctrl-C twice) exits at once with status 130: what the job wrote
    is safe (every file appears by atomic rename), only the step in progress is lost.

    Use as `stop = StopRequest().listen()` (until `close()`) or as a `with` block. Handlers are
    installed in the main thread only (Python's rule); the previous handlers come back on close.
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def listen(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.listen() if not self._previous else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal is not None:
            print(f"pid {os.getpid()}: second SIGINT: leaving now", file=sys.stderr, flush=True)
            raise SystemExit(LEAVE_NOW_EXIT)
        if self.signal is None:
            print(
                f"pid {os.getpid()}: {name} received: saving at the next safe point, then leaving",
                file=sys.stderr,
                flush=True,
            )
        self.signal = self.signal or name


def ignore_in_worker(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: loader workers ignore the stop signals (SLURM signals every
    process of a task); the main process decides when to leave and then ends its workers."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stop_workers(batches: object) -> None:
    """End a DataLoader iterator's workers now. Workers started with `ignore_in_worker` ignore
    SIGTERM, so the interpreter's exit, which ends left-over workers with SIGTERM and waits for
    them, would wait forever: every loop over such a loader ends it with this (the iterator's own
    shutdown: the workers finish their batch and leave)."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's _MultiProcessingDataLoaderIter
    if shutdown is not None:
        shutdown()
