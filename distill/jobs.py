"""The command line of a training job: flags from its config dataclass, `--config FILE`, the
exit codes. `launch/distill.py` and `launch/adapt.py` are this with their config and train
function.

Exit codes: 0 done; 2 a user mistake (one line naming the flag, file or key); 75 the run saved
and left on SIGUSR1/SIGTERM (`distill.preempt.REQUEUE_EXIT`: requeue me).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from distill.config import TrainConfig
from distill.preempt import REQUEUE_EXIT, Preempted, StopRequest


def job_parser(doc: str, cls: type[TrainConfig]) -> argparse.ArgumentParser:
    """`--config` plus one flag per field of `cls` (`teachers.flags`), and the launcher's
    `--local_rank`."""
    from teachers.flags import add_config_flags

    p = argparse.ArgumentParser(
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="JSON file with any of the fields below; explicit flags win")
    add_config_flags(p, cls)
    # set by the deepspeed launcher
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


def run_job(
    parser: argparse.ArgumentParser,
    cls: type[TrainConfig],
    train: Callable[[TrainConfig, StopRequest], object],
    argv: list[str] | None,
    stop: StopRequest | None,
) -> int:
    """Parse `argv`, build the config (from --config, then the flags), train; the exit code."""
    stop = stop or StopRequest().listen()
    args = vars(parser.parse_args(argv))
    args.pop("local_rank", None)
    try:
        config = args.pop("config", None)
        cfg = cls.from_file(config, **args) if config else cls(**args)
        train(cfg, stop)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as left:
        print(left, file=sys.stderr, flush=True)
        return REQUEUE_EXIT
    return 0
