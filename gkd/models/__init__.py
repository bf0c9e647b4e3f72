"""Teachers, students and their weight handling (see ARCHITECTURE.md §4)."""
from .weights import CheckpointError, load_state_dict_file
from .decoders import DECODERS, Decoder, Mask2FormerDecoder, MLPDecoder, build_decoder
from .student import (
    CNNStudent,
    Student,
    ViTStudent,
    build_student,
    build_student_from_spec,
    same_architecture,
)
from .teacher import HFTeacher, Teacher, TimmTeacher, TimmViTTeacher, build_teacher
from gkd.tensors import Tokens
from .segmentor import (
    Segmentor,
    build_segmentor,
    build_segmentor_from_spec,
    load_encoder_for_segmentor,
    load_segmentor,
    save_segmentor,
)

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
    "DECODERS",
    "Decoder",
    "Mask2FormerDecoder",
    "MLPDecoder",
    "build_decoder",
    "Segmentor",
    "build_segmentor",
    "build_segmentor_from_spec",
    "save_segmentor",
    "load_segmentor",
    "load_encoder_for_segmentor",
]
