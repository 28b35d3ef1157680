"""`sam_mini`: the reference teacher, a small SAM trained by this project and shipped with it.

No SAM weights or datasets reach the machines this project is developed and tested on, so a
teacher with random weights would make every quality figure meaningless. `sam_mini` is SAM in
miniature (`segment_anything`'s own `ImageEncoderViT`, `PromptEncoder` and `MaskDecoder`, in the
official flat key layout) trained on scenes built from real photographs by
`launch/train_reference.py` (the job is `distill/reference.py`). It plays the part that
shakespeare_char plays for nanoGPT: small, but real enough that its figures mean something.

Sizes: a 512-px input at patch 16 (a 32 x 32 token grid, so a DFA student's local and dilated
tiles differ from global attention), width 128, 6 blocks, windowed attention (window 8) with two
global blocks, as `segment_anything/build_sam.py` lays out ViT-B/L/H; the prompt encoder and the
mask decoder are SAM's, unchanged. The shipped file stores its tensors in fp16 (half the bytes);
loading casts them back to fp32. The builder is `teachers.build.build_sam_mini`.
"""

from __future__ import annotations

from pathlib import Path

SAM_MINI_IMG_SIZE = 512
SAM_MINI_WIDTH = 128
SAM_MINI_DEPTH = 6
SAM_MINI_HEADS = 4
SAM_MINI_WINDOW = 8
SAM_MINI_GLOBAL = (2, 5)
# The shipped weights, beside this module so that an installed package carries them.
SAM_MINI_PATH = Path(__file__).resolve().parent / "weights" / "sam_mini.pth"


def shipped_weights() -> Path:
    """The path of the shipped checkpoint, or a ValueError saying how to make it."""
    if not SAM_MINI_PATH.is_file():
        raise ValueError(
            f"the sam_mini checkpoint {SAM_MINI_PATH} is missing: restore it from the repository "
            "(git checkout -- teachers/weights) or train it with launch/train_reference.py"
        )
    return SAM_MINI_PATH
