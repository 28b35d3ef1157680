"""Benchmark: distillation throughput from the cache against an online teacher (distill/bench.py).

python launch/bench_distill.py [--teacher vit_tiny|vit_b|vit_h] [--student dfa_s] [--batch-size 4]

Generates COCO-format images (eval/synthetic.py) in OUT/coco, caches a random-weight teacher's
features from them, and prints the throughput table.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import torch  # noqa: E402

from distill.bench import parse_args, random_teacher, report, run  # noqa: E402
from eval.synthetic import make_coco  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    teacher = random_teacher(cfg.teacher)
    size = teacher.img_size
    images = Path(cfg.out) / "coco"
    make_coco(images, num_images=cfg.batch_size * 4, seed=0, min_side=size // 2, max_side=size)
    print(
        f"teacher {cfg.teacher} (random weights), student {cfg.student}, batch {cfg.batch_size}, "
        f"{torch.get_num_threads()} threads, {cfg.workers} loader workers"
    )
    report(cfg, dict(run(cfg, str(images), teacher)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
