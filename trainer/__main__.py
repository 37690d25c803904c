"""``python -m trainer`` (or ``accelerate launch -m trainer``): see ``--help``."""

from __future__ import annotations

import sys

from trainer.checkpoint import CheckpointError
from trainer.config import parse_job
from trainer.data import DataError


def main(argv: list[str] | None = None) -> int:
    job = parse_job(argv)
    from trainer.loop import LaunchError, train  # after argument parsing: --help answers without importing torch

    try:
        train(job)
    except (DataError, CheckpointError, LaunchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only file system, permissions: checkpoints already written are kept
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}; run again with --resume_from_checkpoint latest once fixed", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
