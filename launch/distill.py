r"""Distill a SAM teacher's cached features into a student encoder (see distill/train.py).

    deepspeed launch/distill.py --shards /data/cache/vit_h --student dfa_s --out runs/dfa_s \
        --teacher-ckpt sam_vit_h_4b8939.pth [--steps N] [--batch-size B] [--lr X] [--dld MODE] [--resume auto]
    python launch/distill.py ...            # the same, as one process
    ... --config run.json                    # fields from a JSON file; explicit flags win

The teacher's facts (teacher, taps, image size, codec) come from the cache's manifest.json; a
flag that states one must agree with it. SIGUSR1 or SIGTERM: save a checkpoint after the current
step and exit 75 (requeue me); --resume auto continues there.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402


def parser() -> argparse.ArgumentParser:
    from distill.config import DistillConfig
    from teachers.flags import add_config_flags

    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="JSON file with any of the fields below; explicit flags win")
    add_config_flags(p, DistillConfig)
    # set by the deepspeed launcher
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, stop=None) -> int:
    """Parse, train; user mistakes print one line and return 2, a run that saved and left on
    SIGUSR1/SIGTERM returns 75 (`distill.preempt.REQUEUE_EXIT`: requeue me)."""
    from distill.preempt import REQUEUE_EXIT, Preempted, StopRequest

    stop = stop or StopRequest().listen()
    args = vars(parser().parse_args(argv))
    args.pop("local_rank", None)
    from distill.config import DistillConfig
    from distill.train import train

    try:
        config = args.pop("config", None)
        cfg = DistillConfig.from_file(config, **args) if config else DistillConfig(**args)
        train(cfg, stop)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as left:
        print(left, file=sys.stderr, flush=True)
        return REQUEUE_EXIT
    return 0


if __name__ == "__main__":
    from distill.preempt import StopRequest  # standard library only: listening before torch loads

    sys.exit(main(stop=StopRequest().listen()))
