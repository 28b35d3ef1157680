"""The exit statuses every entry point shares, and the one guard that maps a run's outcome to them.

0 done (or the status the run returns); 2 a user mistake: a `ValueError` or `FileNotFoundError`,
printed as one line `error: ...` naming the flag, file or key, without a traceback; 75
(`REQUEUE_EXIT`) the run saved its progress on SIGUSR1/SIGTERM and raised `Preempted`: requeue me.
Standard library only, like `preempt`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from teachers.runtime.preempt import REQUEUE_EXIT, Preempted

USER_ERROR = 2


def exit_status(run: Callable[[], object]) -> int:
    """Call `run()`; its int result (other results count as 0), or the status of what it
    raised: `USER_ERROR` for a user mistake, `REQUEUE_EXIT` after a save on a signal."""
    try:
        result = run()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
    except Preempted as left:
        print(left, file=sys.stderr, flush=True)
        return REQUEUE_EXIT
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
