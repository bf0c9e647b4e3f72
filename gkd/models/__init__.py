"""Teachers, students and their weight handling (see DESIGN.md §3)."""
from .checkpoints import CheckpointError, load_state_dict_file
from .student import (
    CNNStudent,
    Student,
    ViTStudent,
    build_student,
    build_student_from_spec,
    same_architecture,
)
from .teacher import HFTeacher, Teacher, TimmTeacher, TimmViTTeacher, build_teacher
from .tokens import Tokens

__all__ = [
    "build_teacher",
    "build_student",
    "build_student_from_spec",
    "same_architecture",
    "Teacher",
    "TimmViTTeacher",
    "TimmTeacher",
    "HFTeacher",
    "Student",
    "ViTStudent",
    "CNNStudent",
    "Tokens",
    "CheckpointError",
    "load_state_dict_file",
]
