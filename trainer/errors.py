"""The trainer's failures, by what the user has to fix; ``python -m trainer`` maps each to its exit code.

Torch-free, so that the command can classify a failure (a missing torch included) without importing torch.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint or model folder that cannot be loaded (bad input data, exit 1); the message names the file."""


class ModelNotFoundError(CheckpointError):
    """The model asked for is not on disk, or is not a checkpoint folder (bad usage, exit 2); says what to pass."""


class ConfigError(ValueError):
    """Settings that cannot run as given: the output folder, a resume with other settings, the batch size (exit 2)."""


class LaunchError(RuntimeError):
    """The processes were not started as the user asked (exit 2)."""


class DivergedError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or weight; the message names the step (exit 2)."""


class MissingTrainingPackage(RuntimeError):
    """torch, transformers or accelerate is not installed (the environment, exit 3)."""
