"""Training and the PyTorch INSTRUCTOR model (the export source)."""

from trainer.model import InstructorModel

__all__ = ["InstructorModel"]
