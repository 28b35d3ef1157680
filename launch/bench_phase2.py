"""Benchmark: the cost of a phase-2 (decoder alignment) step against a phase-1 step, one run.

python launch/bench_phase2.py [--out runs/bench_phase2] [--steps 20] [--img-size 256]

Generates COCO-format images, caches the random-weight vit_tiny teacher's features, distils a
dfa_t for a few steps, then times phase-1 and phase-2 steps (prompts per image and refinement
rounds as listed) from that student on the same cache, alternating, and prints images per second
and the ratio to phase 1 (median over each run's steps after the first).
"""

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "launch"]
sys.path.insert(0, str(REPO))

from eval.synthetic import make_coco  # noqa: E402
from teachers import load_teacher  # noqa: E402
from teachers.cache import plan_cache, write_cache  # noqa: E402

VARIANTS = {
    "phase 1 (features)": [],
    "phase 2, 8 prompts": ["--phase", "decoder", "--max-prompts", "8"],
    "phase 2, 8 prompts, 1 click round": ["--phase", "decoder", "--max-prompts", "8"]
    + ["--decode-iters", "1"],
    "phase 2, 8 prompts + feature loss": ["--phase", "decoder", "--max-prompts", "8"]
    + ["--feature-weight", "1"],
}


def distill(out: Path, cache: Path, steps: int, extra: list[str]) -> list[float]:
    """Run launch/distill.py; the images per second of each logged step."""
    cmd = [sys.executable, str(REPO / "launch/distill.py"), "--shards", str(cache)]
    cmd += ["--out", str(out), "--steps", str(steps), "--batch-size", "4", "--student", "dfa_t"]
    cmd += ["--engine", "torch", "--workers", "0", "--no-progress", "--device", "cpu"]
    cmd += ["--log-every", str(steps), *extra]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    with open(out / "log.csv", newline="") as f:
        return [float(r["images_per_s"]) for r in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_phase2", help="Work folder.")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per variant and round.")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds per variant.")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.rounds < 1:
        parser.error("--steps must be at least 2 and --rounds at least 1")
    out = Path(args.out)
    make_coco(out / "coco", num_images=16, seed=3)
    if not (out / "cache" / "manifest.json").exists():
        teacher = load_teacher("vit_tiny", taps=(1, 3))
        write_cache(teacher, plan_cache(str(out / "coco"), 8), out / "cache", progress=False)
    distill(out / "phase1", out / "cache", 10, [])
    init = ["--init", str(out / "phase1" / "student.pt")]
    speeds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for i, (name, extra) in enumerate(VARIANTS.items()):
            run = out / f"run{r}_{i}"
            speeds[name] += distill(run, out / "cache", args.steps, [*init, *extra])[1:]
    base = statistics.median(speeds["phase 1 (features)"])
    print(f"{'step':<36} {'images/s':>9} {'time per image vs phase 1':>26}")
    for name, values in speeds.items():
        rate = statistics.median(values)
        print(f"{name:<36} {rate:>9.2f} {base / rate:>25.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
