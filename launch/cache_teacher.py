"""Cache a frozen SAM teacher's features into WebDataset shards (see teachers/cache.py).

    python launch/cache_teacher.py --teacher vit_h --teacher-ckpt sam_vit_h_4b8939.pth \
        --images '/data/sa1b/sa_{000020..000029}.tar' --out /data/cache/vit_h
    python launch/cache_teacher.py --out /data/cache/vit_h --verify 16 --teacher-ckpt ...
"""

import sys
from pathlib import Path

# `python launch/x.py` puts launch/ first on sys.path, where it would shadow the packages.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

if __name__ == "__main__":
    # Listen before torch loads (teachers.runtime.preempt is standard library only): a SLURM signal
    # during the slow start-up is then recorded and answered at the first safe point, not fatal.
    from teachers.runtime.preempt import StopRequest

    stop = StopRequest().listen()
    from teachers.cache_cli import main

    sys.exit(main(stop=stop))
