"""LVIS v1 val evaluation: GT-box or click mIoU, or detector-box mask AP.

    python eval/lvis.py --ckpt runs/dfa_s/student.pt --lvis-root /data/lvis --coco-root /data/coco

Images are read from COCO's train2017/ and val2017/ folders, by the last two parts of each
image's coco_url. Flags and protocol: eval/cli.py and eval/README.md.
"""

import sys
from pathlib import Path

# `python eval/lvis.py` puts eval/ first on sys.path, where this file would shadow packages
# (eval/lvis.py hides the `lvis` package); drop it and put the repository root instead.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

from eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("lvis"))
