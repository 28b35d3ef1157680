"""Student blocks paired with a teacher's taps (`students.taps`)."""

import pytest

from students.taps import student_taps_for


def test_student_taps_follow_relative_depth():
    assert student_taps_for([7, 15, 23, 31], 32, 8) == [1, 3, 5, 7]
    assert student_taps_for([1, 3], 4, 6) == [2, 5]
    with pytest.raises(ValueError, match="repeated student blocks"):
        student_taps_for([7, 15, 23, 31], 32, 2)
