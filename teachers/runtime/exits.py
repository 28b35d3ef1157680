"""The exit statuses every entry point shares, and the one guard that maps a run's outcome to them.

0 done (or the status the run returns); 2 a user mistake: a `ValueError` or `FileNotFoundError`,
printed as one line `error: ...` naming the flag, file or key, without a traceback, or an error of
the operating system (a read-only or full disk, a file where a folder should be), printed as one
line naming the path and the errno's meaning; 75
(`REQUEUE_EXIT`) the run saved its progress on SIGUSR1/SIGTERM and raised `Preempted`: requeue me.
Standard library only, like `preempt`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from teachers.runtime.preempt import REQUEUE_EXIT, Preempted

USER_ERROR = 2


def describe_os_error(err: OSError) -> str:
    """One line for an OS error: the path and the errno's meaning ("/x/y: No space left on
    device"); an error the project raised with its own message keeps that message."""
    if err.errno is None:
        return str(err)
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    reason = err.strerror or os.strerror(err.errno)
    return f"{' -> '.join(map(str, paths))}: {reason}" if paths else reason


def exit_status(run: Callable[[], object]) -> int:
    """Call `run()`; its int result (other results count as 0), or the status of what it
    raised: `USER_ERROR` for a user mistake or an OS error (one line each), `REQUEUE_EXIT`
    after a save on a signal."""
    try:
        result = run()
    except OSError as err:  # FileNotFoundError included
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return USER_ERROR
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
    except Preempted as left:
        print(left, file=sys.stderr, flush=True)
        return REQUEUE_EXIT
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
