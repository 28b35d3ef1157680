r"""Distill a SAM teacher's cached features into a student encoder (see distill/train.py).

    deepspeed launch/distill.py --shards /data/cache/vit_h --student dfa_s --out runs/dfa_s \
        --teacher-ckpt sam_vit_h_4b8939.pth [--steps N] [--batch-size B] [--lr X] [--dld MODE] [--resume auto]
    python launch/distill.py ...            # the same, as one process
    ... --config run.json                    # fields from a JSON file; explicit flags win

The teacher's facts (teacher, taps, image size, codec) come from the cache's manifest.json; a
flag that states one must agree with it. SIGUSR1, SIGTERM or Ctrl-C: save a checkpoint after the current
step and exit 75 (requeue me); --resume auto continues there.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))


def parser():
    from distill.config import DistillConfig
    from distill.jobs import job_parser

    return job_parser(__doc__, DistillConfig)


def main(argv: list[str] | None = None, stop=None) -> int:
    """Parse, train; the exit code (`distill.jobs.run_job`: 0, 2 for a user mistake, 75 after
    saving on SIGUSR1/SIGTERM)."""
    from distill.config import DistillConfig
    from distill.jobs import run_job
    from distill.train import train

    return run_job(parser(), DistillConfig, train, argv, stop)


if __name__ == "__main__":
    from teachers.runtime.preempt import (
        StopRequest,  # standard library only: listening before torch loads
    )

    sys.exit(main(stop=StopRequest().listen()))
