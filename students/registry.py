"""Student registry, in the style of timm's ``@register_model``.

Builders live beside their architecture (``students/encoder.py``) and hold the sizes; this file
only maps names to builders and records how a model was built, so that an export file can
rebuild it with ``build_student(model.student_name, **model.student_kwargs)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

DEFAULT_STUDENT = "dfa_s"

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])


def register_student(builder: BuilderT) -> BuilderT:
    """Decorator: register ``builder`` under its function name."""
    name = builder.__name__
    if name in _BUILDERS:
        raise ValueError(f"student {name!r} is registered twice")
    _BUILDERS[name] = builder
    return builder


def list_students() -> list[str]:
    """Names of every registered student, sorted."""
    return sorted(_BUILDERS)


def build_student(name: str = DEFAULT_STUDENT, **kwargs: Any) -> nn.Module:
    """Build student ``name``; ``kwargs`` override the builder's defaults (e.g. ``img_size``).

    The module gets ``student_name`` and ``student_kwargs`` (plain Python types) attributes.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown student {name!r}; known students: {', '.join(list_students())}")
    plain = {key: _plain(value, key) for key, value in kwargs.items()}
    model = _BUILDERS[name](**plain)
    model.student_name = name
    model.student_kwargs = plain
    return model


def _plain(value: Any, key: str) -> Any:
    # Export files are loaded with torch.load(weights_only=True) and may be written as json:
    # keep only plain types, tuples as lists.
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(item, key) for item in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(item, key) for k, item in value.items()}
    raise ValueError(
        f"student kwarg {key!r} has type {type(value).__name__}; only None, bool, int, float, "
        f"str and lists/dicts of them can be stored for an export file to rebuild the model"
    )
