"""Plot every DLD mode's weights over a run for a teacher's default taps (the README's figure).

python launch/plot_dld.py [--teacher vit_h] [--floor 0.2] [--out distill/dld_weights.png]
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402

from distill.logs import plot_dld_modes  # noqa: E402
from teachers.build import DEFAULT_TAPS  # noqa: E402
from teachers.teacher import feature_names  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--teacher", default="vit_h", choices=sorted(DEFAULT_TAPS), help="whose default taps"
    )
    p.add_argument("--floor", type=float, default=0.2, help="least weight of the final embedding")
    p.add_argument(
        "--out", default=str(_here.parent / "distill" / "dld_weights.png"), help="PNG file"
    )
    args = p.parse_args(argv)
    names = feature_names(DEFAULT_TAPS[args.teacher])
    path = plot_dld_modes(Path(args.out), names[1:] + names[:1], floor=args.floor)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
