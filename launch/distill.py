"""Distill a SAM teacher's cached features into a student encoder (see distill/train.py).

    deepspeed launch/distill.py --shards /data/cache/vit_h --student dfa_s --out runs/dfa_s \
        --teacher-ckpt sam_vit_h_4b8939.pth [--steps N] [--batch-size B] [--lr X] [--dld MODE] [--resume auto]
    python launch/distill.py ...            # the same, as one process
    ... --config run.json                    # fields from a JSON file; explicit flags win
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err


def parser() -> argparse.ArgumentParser:
    from distill.config import PRECISIONS
    from distill.schedule import DLD_MODES

    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    add = p.add_argument
    add("--config", help="JSON file with any of the fields below; explicit flags override it")
    add("--shards", help="cache folder (with manifest.json) or a glob of its shards")
    add("--student", help="student name (default dfa_s)")
    add("--out", help="run folder")
    add("--steps", type=int, help="optimizer steps (default 1000)")
    add("--batch-size", type=int, help="global batch size (default 8)")
    add("--micro-batch-size", type=int, help="per-process micro-batch (default batch / processes)")
    add("--lr", type=float, help="peak learning rate (default 1e-3)")
    add("--weight-decay", type=float)
    add("--warmup-steps", type=int, help="default 5%% of steps")
    add("--min-lr-ratio", type=float)
    add("--grad-clip", type=float)
    add("--dld", choices=DLD_MODES, help="dynamic layer-wise weights (default progressive)")
    add("--dld-floor", type=float, help="least weight of the final embedding (default 0.2)")
    add("--dld-every-epochs", type=float, help="stepwise: epochs per pair")
    add("--teacher", help="expected teacher (default from --teacher-ckpt, else vit_h)")
    add("--teacher-ckpt", help="the teacher checkpoint the cache was made with")
    add("--teacher-taps", type=_ints, help="expected tapped teacher blocks")
    add("--student-taps", type=_ints, help="student blocks paired with the teacher taps")
    add("--img-size", type=int, help="expected cache image size (default 1024)")
    add("--codec", help="expected cache codec (default any)")
    add("--precision", choices=PRECISIONS)
    add("--zero-stage", type=int)
    add("--checkpoint-every", type=int)
    add("--keep-checkpoints", type=int)
    add("--resume", choices=("auto",))
    add("--log-every", type=int)
    add("--workers", type=int, help="data loader workers per process")
    add("--shuffle-buffer", type=int)
    add("--on-corrupt", choices=("skip", "stop"))
    add("--max-nonfinite", type=int)
    add("--seed", type=int)
    add("--device", choices=("auto", "cpu", "cuda"))
    add("--no-progress", dest="progress", action="store_false")
    add(
        "--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS
    )  # set by the deepspeed launcher
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    args.pop("local_rank", None)
    from distill.config import DistillConfig
    from distill.train import train

    try:
        config = args.pop("config", None)
        cfg = DistillConfig.from_file(config, **args) if config else DistillConfig(**args)
        train(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
