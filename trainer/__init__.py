"""Training, the PyTorch INSTRUCTOR model (the export source) and InstructorEmbedding 1.0.1's class on it."""

from trainer.instructor import INSTRUCTOR
from trainer.model import InstructorModel

__all__ = ["INSTRUCTOR", "InstructorModel"]
