"""Frozen SAM teachers, the one preprocessing, and the sharded teacher-feature cache."""

from teachers.build import DEFAULT_TAPS, TEACHER_NAMES, load_sam_checkpoint, read_checkpoint
from teachers.preprocess import Preprocessed, decode_image, load_image, preprocess
from teachers.teacher import Teacher, load_teacher, tap_name

__all__ = [
    "DEFAULT_TAPS",
    "TEACHER_NAMES",
    "Preprocessed",
    "Teacher",
    "decode_image",
    "load_image",
    "load_sam_checkpoint",
    "load_teacher",
    "preprocess",
    "read_checkpoint",
    "tap_name",
]
