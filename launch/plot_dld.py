"""Plot every DLD mode's weights over a run for a teacher's default taps (the README's figure).

python launch/plot_dld.py [--teacher vit_h] [--floor 0.2] [--out distill/dld_weights.png]
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

from dataclasses import dataclass, field  # noqa: E402

from distill.logs import plot_dld_modes  # noqa: E402
from teachers.build import DEFAULT_TAPS  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402
from teachers.teacher import feature_names  # noqa: E402


@dataclass
class PlotConfig:
    """The DLD figure."""

    teacher: str = field(default="vit_h", metadata={"choices": sorted(DEFAULT_TAPS)})
    """Whose default taps."""
    floor: float = 0.2
    """Least weight of the final embedding."""
    out: str = str(_here.parent / "distill" / "dld_weights.png")
    """PNG file."""


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(PlotConfig, argv, __doc__)
    names = feature_names(DEFAULT_TAPS[cfg.teacher])
    path = plot_dld_modes(Path(cfg.out), names[1:] + names[:1], floor=cfg.floor)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
