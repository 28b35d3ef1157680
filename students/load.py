"""One loader for every file a `segment_anything` `Sam` is rebuilt from.

`load_sam(path)` reads the file once (`weights_only=True`) and dispatches on its contents:

* `student.pt` (`students.export`): a student encoder with SAM's prompt encoder and decoder;
* `adapted.pt` (`students.adapters.export`): its base (a `student.pt` or an official checkpoint,
  checked by sha256) loaded through `load_sam` itself, then the adapter and the delta on it;
* anything else must be an official SAM checkpoint (a flat state dict, `teachers.build`).

The result is a `Sam` in eval mode that `SamPredictor` and `SamAutomaticMaskGenerator` take
unchanged, so teachers, students and adapted models share one code path in evaluation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from segment_anything.modeling import Sam

from students.adapters import export as adapted
from students.export import FORMAT as STUDENT_FORMAT
from students.export import load_student
from teachers.build import sam_from_state
from teachers.runtime.files import check_flat, safe_load


def load_sam(
    path: str | Path, device: str | torch.device = "cpu", base: str | Path | None = None
) -> Sam:
    """A `Sam` in eval mode from a `student.pt`, an `adapted.pt` (`base` overrides the base
    checkpoint path it records) or an official SAM checkpoint."""
    payload = safe_load(path)
    kind = payload.get("format") if isinstance(payload, dict) else None
    if kind == STUDENT_FORMAT:
        sam = load_student(payload, str(path))
    elif kind == adapted.FORMAT:
        base_path = adapted.base_path_of(payload, str(path), base)
        sam = adapted.load_adapted(payload, str(path), load_sam(base_path))
    else:
        sam = sam_from_state(None, check_flat(payload, path), str(path))
    return sam.to(device).eval()
