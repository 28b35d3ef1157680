"""Benchmark: distillation throughput from the cache against an online teacher (distill/bench.py).

python launch/bench_distill.py [--teacher vit_tiny|vit_b|vit_h] [--student dfa_s] [--batch-size 4]
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

from distill.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
