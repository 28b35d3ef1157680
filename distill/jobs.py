"""The command line of a training job: flags from its config dataclass, `--config FILE`, the
exit codes. `launch/distill.py` and `launch/adapt.py` are this with their config and train
function.

Exit codes (`teachers.runtime.exits`): 0 done; 2 a user mistake (one line naming the flag, file
or key); 75 the run saved and left on SIGUSR1/SIGTERM (`REQUEUE_EXIT`: requeue me).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from distill.config import TrainConfig
from teachers.runtime.exits import exit_status
from teachers.runtime.preempt import StopRequest


def job_parser(doc: str, cls: type[TrainConfig]) -> argparse.ArgumentParser:
    """`--config` plus one flag per field of `cls` (`teachers.runtime.flags`), and the launcher's
    `--local_rank`."""
    from teachers.runtime.flags import add_config_flags

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
    config = args.pop("config", None)

    def run() -> None:
        cfg = cls.from_file(config, **args) if config else cls(**args)
        train(cfg, stop)

    return exit_status(run)
