"""``python -m trainer`` (or ``accelerate launch -m trainer``): see ``--help``.

Exit codes (``runtime.exit_codes``): 1 bad input data (a MEDI row, a damaged checkpoint or model file: the message
names the file, and the row and field); 2 bad usage or configuration (options, the output folder, a resume with
other settings, a run that diverged to a NaN loss); 3 the environment (disk, permissions, a missing package);
4 an internal error (the traceback in a log file, or on stderr with ``--debug``); 130 interrupted.
"""

from __future__ import annotations

import sys

from runtime.exit_codes import ENVIRONMENT, INPUT, USAGE, run_cli
from trainer.config import parse_command
from trainer.data import DataError
from trainer.errors import (
    CheckpointError,
    ConfigError,
    DivergedError,
    LaunchError,
    MissingTrainingPackage,
    ModelNotFoundError,
)

# Most specific first: a missing model is a CheckpointError the user fixes with another option.
EXIT_CODES = {
    MissingTrainingPackage: ENVIRONMENT,
    ModelNotFoundError: USAGE,
    ConfigError: USAGE,
    LaunchError: USAGE,
    DivergedError: USAGE,
    DataError: INPUT,
    CheckpointError: INPUT,
}
OS_HINT = "checkpoints already written are kept: once fixed, run again (with --resume_from_checkpoint latest if any were written)"


def main(argv: list[str] | None = None) -> int:
    job, debug = parse_command(argv)  # --help and bad options answer here, before torch is imported

    def body() -> int:
        try:
            from trainer.loop import train
        except ModuleNotFoundError as exc:
            raise MissingTrainingPackage(f"{exc}; training needs the train extra: pip install 'instructor-stack[train]'") from exc
        train(job)
        return 0

    return run_cli(
        body, prog="python -m trainer", known=EXIT_CODES, debug=debug, os_hint=OS_HINT,
        on_interrupt="interrupted: checkpoints already written are kept; continue with --resume_from_checkpoint latest",
    )


if __name__ == "__main__":
    sys.exit(main())
