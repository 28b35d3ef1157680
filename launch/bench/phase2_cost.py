"""Benchmark: the cost of a phase-2 (decoder alignment) step against a phase-1 step, one run.

    python launch/bench/phase2_cost.py [--out runs/bench_phase2] [--steps 20] [--rounds 2]

Generates COCO-format images, caches the random-weight vit_tiny teacher's features, distils a
dfa_t for a few steps, then times phase-1 and phase-2 steps (prompts per image and refinement
rounds as listed) from that student on the same cache, alternating, and prints images per second
and the ratio to phase 1 (median over each run's steps after the first); writes OUT/results.json,
or the --results file.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

import csv  # noqa: E402
import statistics  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from eval.scenes.synthetic import make_coco  # noqa: E402
from launch.bench import common  # noqa: E402
from teachers import load_teacher  # noqa: E402
from teachers.cache import plan_cache, write_cache  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402

VARIANTS = {
    "phase 1 (features)": [],
    "phase 2, 8 prompts": ["--phase", "decoder", "--max-prompts", "8"],
    "phase 2, 8 prompts, 1 click round": ["--phase", "decoder", "--max-prompts", "8"]
    + ["--decode-iters", "1"],
    "phase 2, 8 prompts + feature loss": ["--phase", "decoder", "--max-prompts", "8"]
    + ["--feature-weight", "1"],
}


@dataclass
class Phase2CostConfig:
    """One run of the phase-2 cost benchmark."""

    out: str = "runs/bench_phase2"
    """Work folder (the data and the cache are reused)."""
    results: str = ""
    """Results JSON (figures, command, machine, date); unset: OUT/results.json."""
    steps: int = 20
    """Timed steps per variant and round."""
    rounds: int = 2
    """Alternating rounds per variant."""

    def __post_init__(self) -> None:
        if self.steps < 2 or self.rounds < 1:
            raise ValueError("--steps must be at least 2 and --rounds at least 1")


def distill(out: Path, cache: Path, steps: int, extra: list[str]) -> list[float]:
    """Run launch/distill.py (its output in OUT.log); the images per second of each logged step."""
    args = ["--shards", str(cache), "--out", str(out), "--steps", str(steps)]
    args += ["--batch-size", "4", "--student", "dfa_t"]
    args += ["--engine", "torch", "--workers", "0", "--no-progress", "--device", "cpu"]
    args += ["--log-every", str(steps), *extra]
    common.run_script("launch/distill.py", *args, log=out.with_name(f"{out.name}.log"))
    with open(out / "log.csv", newline="") as f:
        return [float(r["images_per_s"]) for r in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Phase2CostConfig, argv, __doc__)
    out = Path(cfg.out).resolve()  # the scripts it runs start in the repository
    make_coco(out / "coco", num_images=16, seed=3)
    if not (out / "cache" / "manifest.json").exists():
        teacher = load_teacher("vit_tiny", taps=(1, 3))
        write_cache(teacher, plan_cache(str(out / "coco"), 8), out / "cache", progress=False)
    distill(out / "phase1", out / "cache", 10, [])
    init = ["--init", str(out / "phase1" / "student.pt")]
    speeds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(cfg.rounds):
        for i, (name, extra) in enumerate(VARIANTS.items()):
            run = out / f"run{r}_{i}"
            speeds[name] += distill(run, out / "cache", cfg.steps, [*init, *extra])[1:]
    base = statistics.median(speeds["phase 1 (features)"])
    rows = []
    print(f"{'step':<36} {'images/s':>9} {'time per image vs phase 1':>26}")
    for name, values in speeds.items():
        rate = statistics.median(values)
        rows.append({"variant": name, "images_per_s": rate, "time_vs_phase1": base / rate})
        print(f"{name:<36} {rate:>9.2f} {base / rate:>25.2f}x")
    path = cfg.results or out / "results.json"
    common.write_results(path, {"rows": rows}, cfg, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
