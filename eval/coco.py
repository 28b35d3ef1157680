"""COCO evaluation: GT-box or click mIoU, or detector-box mask AP, of a student or SAM checkpoint.

    python eval/coco.py --ckpt runs/dfa_s/student.pt --coco-root /data/coco
    python eval/coco.py --ckpt sam_vit_h_4b8939.pth --coco-root /data/coco --prompt point --num-clicks 5
    python eval/coco.py --ckpt runs/dfa_s/student.pt --coco-root /data/coco --det-json coco_vitdet.json

Flags and protocol: eval/cli.py and eval/README.md.
"""

import sys
from pathlib import Path

# `python eval/coco.py` puts eval/ first on sys.path, where this file would shadow packages
# (eval/lvis.py hides the `lvis` package); drop it and put the repository root instead.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

from eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("coco"))
