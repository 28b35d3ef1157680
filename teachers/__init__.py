"""Frozen SAM teachers, the one preprocessing, the data sources and the sharded teacher-feature
cache; `teachers.runtime` is the ground floor every room may use.

The names below are imported on first use, so that importing the ground floor
(`teachers.runtime.preempt`, which an entry script does before torch loads) stays light.
"""

import sys
import types
from importlib import import_module
from typing import Any

_NAMES = {
    "DEFAULT_TAPS": "teachers.build",
    "TEACHER_NAMES": "teachers.build",
    "load_sam_checkpoint": "teachers.build",
    "read_checkpoint": "teachers.runtime.files",
    "Preprocessed": "teachers.preprocess",
    "decode_image": "teachers.preprocess",
    "load_image": "teachers.preprocess",
    "preprocess": "teachers.preprocess",
    "Teacher": "teachers.teacher",
    "load_teacher": "teachers.teacher",
    "tap_name": "teachers.teacher",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'teachers' has no attribute {name!r}")
    return getattr(import_module(_NAMES[name]), name)


class _Package(types.ModuleType):
    """Keeps `teachers.preprocess` the function (the API) once its module is imported: the import
    system sets every imported submodule as an attribute of its package."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "preprocess" and isinstance(value, types.ModuleType):
            value = value.preprocess
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
