r"""Adapt a distilled student or a SAM model to a domain of binary masks (see distill/adapt.py).

    deepspeed launch/adapt.py --ckpt runs/dfa_s/student.pt --method conv_lora \
        --data /data/COD10K --out runs/cod_conv_lora [--steps N] [--batch-size B] [--lr X] \
        [--prompt full_box|gt_box] [--loss structure|bce_dice] [--resume auto]
    python launch/adapt.py ...              # the same, as one process
    ... --config run.json                    # fields from a JSON file; explicit flags win

--data holds train/{images,masks} and val/{images,masks} (COD10K, CAMO, ISTD, Kvasir-SEG, ISIC
after renaming). The base encoder stays frozen; the adapter and the mask decoder train, and
OUT/adapted.pt loads with students.load_sam. SIGUSR1, SIGTERM or Ctrl-C: save a checkpoint after the
current step and exit 75 (requeue me); --resume auto continues there.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))


def parser():
    from distill.config import AdaptConfig
    from distill.jobs import job_parser

    return job_parser(__doc__, AdaptConfig)


def main(argv: list[str] | None = None, stop=None) -> int:
    """Parse, train; the exit code (`distill.jobs.run_job`: 0, 2 for a user mistake, 75 after
    saving on SIGUSR1/SIGTERM)."""
    from functools import partial

    from distill.adapt import train
    from distill.config import AdaptConfig
    from distill.jobs import run_job
    from eval.mask_metrics import iou_dice

    # Evaluation's metrics score the validation: training is wired to them here, not in distill/.
    return run_job(parser(), AdaptConfig, partial(train, scorer=iou_dice), argv, stop)


if __name__ == "__main__":
    from teachers.runtime.preempt import (
        StopRequest,  # standard library only: listening before torch loads
    )

    sys.exit(main(stop=StopRequest().listen()))
