r"""Forwarder: the speed table lives in the benchmark wing, `launch/bench/speed.py`.

    python eval/speed.py --models dfa_s,vit_h,mobilesam_vit_t,efficientvit_sam_l0 \
        [--image-size 1024] [--device cpu|cuda] [--baseline vit_h] [--repeats 5] [--out F.json]

This documented command keeps working: it runs that script unchanged, with these arguments
(`runpy.run_path`; nothing of `launch/` is imported here).
"""

import runpy
import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

if __name__ == "__main__":
    script = _here.parent / "launch" / "bench" / "speed.py"
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")
