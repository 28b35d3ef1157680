r"""The reference teacher's quality on held-out scenes: box and point mIoU beside the box-fill
baseline, written to teachers/weights/sam_mini.json (the figures the docs and a test cite).

    python launch/bench/reference_teacher.py [--ckpt teachers/weights/sam_mini.pth]
        [--held-images 200] [--subset-images 16] [--out teachers/weights/sam_mini.json]

Held-out scenes are the held split of `eval.scenes.photos` (photographs the teacher never trained
on) with seed 2, so they are neither the teacher's validation scenes (seed 0) nor the demo's
(seed 1). `eval/coco.py` scores them with EfficientViT-SAM's GT-box protocol (multimask argmax),
with the single-mask output, and with one click (first click at the mask's interior maximum).
The first `--subset-images` scenes are scored again on their own: tests/teachers/test_sam_mini.py
re-measures that subset and holds the figure.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent.parent))

import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from launch.bench.common import REPO, run_script, write_results  # noqa: E402
from teachers.runtime.exits import exit_status  # noqa: E402
from teachers.runtime.files import file_sha256  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402

SEED = 2


@dataclass
class ReferenceTeacherConfig:
    """`launch/bench/reference_teacher.py`."""

    ckpt: str = "teachers/weights/sam_mini.pth"
    """The teacher checkpoint to score (a relative path is taken from the repository root)."""
    held_images: int = 200
    """Held-out scenes scored."""
    subset_images: int = 16
    """The first scenes, scored on their own for the test."""
    work: str = "runs/reference_teacher"
    """Folder for the scenes and the evaluation files."""
    out: str = "teachers/weights/sam_mini.json"
    """The results JSON (a relative path is taken from the repository root)."""

    def __post_init__(self) -> None:
        if not 1 <= self.subset_images <= self.held_images:
            raise ValueError("need 1 <= --subset-images <= --held-images")


def scenes(root: Path, num: int) -> Path:
    """Held-out scenes 0..num-1 (seed `SEED`) as a COCO root, written once."""
    from eval.scenes.photos import make_photo_coco

    if not (root / "annotations" / "instances_val2017.json").exists():
        make_photo_coco(root, "held", num, seed=SEED)
    return root


def score(cfg: ReferenceTeacherConfig, root: Path, name: str, *flags: str) -> dict:
    """One eval/coco.py run on `root`; its summary."""
    out = Path(cfg.work) / f"{name}.json"
    if not out.exists():
        args = [
            "--ckpt",
            str(REPO / cfg.ckpt),
            "--coco-root",
            str(root),
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
        run_script("eval/coco.py", *args, "--no-progress", *flags, log=out.with_suffix(".log"))
    return json.loads(out.read_text())


def measure(cfg: ReferenceTeacherConfig) -> dict:
    """The figures: mIoU x 100 (all, small, medium, large) per protocol, and the subset's."""
    work = Path(cfg.work)
    full = scenes(work / "held", cfg.held_images)
    subset = scenes(work / "subset", cfg.subset_images)
    box = score(cfg, full, "box", "--baseline", "box")
    single = score(cfg, full, "box_single", "--single-mask")
    point = score(cfg, full, "point", "--prompt", "point", "--num-clicks", "1")
    small = score(cfg, subset, "subset_box", "--baseline", "box")
    return {
        "ckpt_sha256": file_sha256(REPO / cfg.ckpt),
        "held_images": cfg.held_images,
        "num_instances": box["num_instances"],
        "seed": SEED,
        "box_miou": box["miou"],
        "box_fill_miou": box["baseline_box"]["miou"],
        "box_single_mask_miou": single["miou"],
        "point_1click_miou": point["miou"],
        "subset": {
            "images": cfg.subset_images,
            "num_instances": small["num_instances"],
            "box_miou": small["miou"]["all"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ReferenceTeacherConfig, argv, __doc__)

    def run() -> None:
        figures = measure(cfg)
        write_results(REPO / cfg.out, figures, cfg, script=__file__, argv=argv)
        b, f, p = figures["box_miou"], figures["box_fill_miou"], figures["point_1click_miou"]
        print(f"held-out box mIoU {b['all']:.1f} (box fill {f['all']:.1f}), 1 click {p['all']:.1f}")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
