"""The student export (`student.pt`) and loading a full `segment_anything` `Sam` from a file.

`student.pt` is one `torch.save`d dict that `torch.load(..., weights_only=True)` reads:

  format          "sam-distill-student"
  format_version  1
  student         {"name": registry name, "kwargs": builder kwargs (plain types)}
  img_size        input side the student was trained at
  teacher         {"name": teacher name, "sha256": teacher checkpoint sha256}
  step            training step of the weights
  mask_decoder    "teacher": the teacher's mask decoder; "student": the student's own, aligned
                  with its embedding by phase 2 (`--phase decoder --tune decoder|both`)
  state_dict      a full SAM state dict: the student under image_encoder.*, the teacher
                  checkpoint's prompt_encoder.* and mask_decoder.*

From it `load_student` rebuilds a `Sam` that `SamPredictor` and `SamAutomaticMaskGenerator` take
unchanged; `students.load.load_sam`, the one loader, dispatches a file to it (and `adapted.pt`
exports and the official SAM checkpoints to theirs), so teachers and students share one code path
in evaluation.
"""

from __future__ import annotations

from pathlib import Path

from segment_anything.modeling import Sam
from torch import nn

from students.registry import build_student
from teachers.build import check_state_dict, sam_heads
from teachers.preprocess import PIXEL_MEAN, PIXEL_STD
from teachers.runtime.files import safe_load, save_atomic

FORMAT = "sam-distill-student"
FORMAT_VERSION = 1


def assemble_sam(
    student: nn.Module, heads_from: Sam | None = None, mask_decoder: nn.Module | None = None
) -> Sam:
    """A `Sam` with `student` as image encoder and SAM's prompt encoder and mask decoder.

    heads_from: a SAM whose prompt encoder and mask decoder weights are copied (the teacher);
    None leaves them randomly initialised. mask_decoder: a decoder whose weights are taken
    instead of heads_from's (the student's own, after phase 2). The student's `img_size` sets
    the prompt geometry.
    """
    prompt, decoder = sam_heads(student.img_size)
    if heads_from is not None:
        prompt.load_state_dict(heads_from.prompt_encoder.state_dict())
        decoder.load_state_dict(heads_from.mask_decoder.state_dict())
    if mask_decoder is not None:
        decoder.load_state_dict(mask_decoder.state_dict())
    return Sam(student, prompt, decoder, list(PIXEL_MEAN), list(PIXEL_STD)).eval()


def save_student(
    path: str | Path,
    student: nn.Module,
    heads_from: Sam,
    *,
    teacher: str,
    teacher_sha256: str,
    step: int,
    mask_decoder: nn.Module | None = None,
) -> Path:
    """Write `student.pt` atomically (a crash never leaves a half-written file at `path`);
    `mask_decoder`: the student's own decoder (phase 2) instead of the teacher's."""
    path = Path(path)
    sam = assemble_sam(student, heads_from, mask_decoder)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "student": {"name": student.student_name, "kwargs": dict(student.student_kwargs)},
        "img_size": int(student.img_size),
        "teacher": {"name": teacher, "sha256": teacher_sha256},
        "step": int(step),
        "mask_decoder": "teacher" if mask_decoder is None else "student",
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()},
    }
    return save_atomic(payload, path)


def load_student(payload: dict, source: str) -> Sam:
    """The `Sam` of a `student.pt` payload (read from `source`, named in errors)."""
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{source}: student format version {payload.get('format_version')} is not {FORMAT_VERSION}"
        )
    try:
        spec, state = payload["student"], payload["state_dict"]
        student = build_student(spec["name"], **spec["kwargs"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{source}: malformed student export ({err!r})") from err
    sam = assemble_sam(student)
    check_state_dict(state, sam.state_dict(), f"student {spec['name']}", source)
    sam.load_state_dict(state, strict=True)
    return sam


def read_export_meta(path: str | Path) -> dict:
    """The metadata of a `student.pt` (everything but the weights)."""
    payload = safe_load(path)
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT):
        raise ValueError(f"{path}: not a sam-distill student export")
    return {k: v for k, v in payload.items() if k != "state_dict"}
