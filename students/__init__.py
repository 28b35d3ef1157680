"""Student encoders for SAM distillation: Dilated Flash Attention ViTs and their registry.

``build_student(name, **kwargs)`` builds a registered student (``list_students()`` names them;
``dfa_s`` is the default); every student maps ``[B, 3, S, S]`` to ``[B, 256, S/16, S/16]``.
``load_sam(path)`` (from ``students.load``) rebuilds a full ``segment_anything`` ``Sam`` from a
``student.pt``, an ``adapted.pt`` or an official SAM checkpoint.
"""

from typing import Any

from students import encoder as _encoder  # noqa: F401  (registers the builders)
from students.dfa import DilatedFlashAttention, dilated_attention
from students.encoder import DFAEncoder
from students.registry import DEFAULT_STUDENT, build_student, list_students, register_student

__all__ = [
    "DEFAULT_STUDENT",
    "DFAEncoder",
    "DilatedFlashAttention",
    "build_student",
    "dilated_attention",
    "list_students",
    "load_sam",
    "register_student",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: the loader depends on teachers/, the encoders do not.
    if name == "load_sam":
        from students.load import load_sam

        return load_sam
    raise AttributeError(f"module 'students' has no attribute {name!r}")
