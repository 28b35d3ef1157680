"""Which student blocks pair with a teacher's tapped blocks: the same relative depth.

The distiller pairs them for layer-wise losses (`distill.train`), and META feeds the same blocks of
a DFA student to its side network (`students.adapters.meta`), so both read this one rule.
"""

from __future__ import annotations

from collections.abc import Sequence


def student_taps_for(
    teacher_taps: Sequence[int], teacher_depth: int, student_depth: int
) -> list[int]:
    """Student blocks at the same relative depth as the teacher's taps (e.g. ViT-H 7,15,23,31 of 32
    -> 1,3,5,7 of 8)."""
    taps = [max(0, round((t + 1) * student_depth / teacher_depth) - 1) for t in teacher_taps]
    if len(set(taps)) != len(taps):
        raise ValueError(
            f"teacher taps {list(teacher_taps)} map onto repeated student blocks {taps}; "
            "give --student-taps explicitly"
        )
    return taps
