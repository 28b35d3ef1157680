r"""Train the reference teacher `sam_mini` on scenes made from scikit-image's photographs.

    python launch/train_reference.py --out runs/sam_mini [--steps N] [--batch-size B] [--lr X]
    python launch/train_reference.py --out runs/sam_mini --resume auto     # continue after a stop

The shipped teachers/weights/sam_mini.pth was made with the defaults (see teachers/README.md for
its command, machine and curve). Scenes come from `eval.scenes.photos.scene` (training split;
validation on the held-out split, whose photographs training never sees); the job is
`distill/reference.py`. SIGUSR1, SIGTERM or Ctrl-C: save a checkpoint after the current step and exit 75;
--resume auto continues there.
"""

import sys
from functools import partial
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))


def parser():
    from distill.jobs import job_parser
    from distill.reference import ReferenceConfig

    return job_parser(__doc__, ReferenceConfig)


def scenes(split: str, index: int):
    """The reference world's scenes at the sizes the teacher trains on (long side 256..512)."""
    from eval.scenes.photos import scene

    return scene(split, index, seed=0, min_side=256, max_side=512)


def main(argv: list[str] | None = None, stop=None) -> int:
    """Parse, train; the exit code (0, 2 for a user mistake, 75 after saving on a signal)."""
    from distill.jobs import run_job
    from distill.reference import ReferenceConfig, train

    return run_job(parser(), ReferenceConfig, partial(train, scenes=scenes), argv, stop)


if __name__ == "__main__":
    from teachers.runtime.preempt import (
        StopRequest,  # standard library only: listening before torch loads
    )

    sys.exit(main(stop=StopRequest().listen()))
