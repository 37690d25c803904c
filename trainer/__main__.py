"""``python -m trainer`` (or ``accelerate launch -m trainer``): see ``--help``."""

from __future__ import annotations

import sys

from trainer.checkpoint import CheckpointError
from trainer.config import parse_args
from trainer.data import DataError


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from trainer.loop import LaunchError, train  # after argument parsing: --help answers without importing torch

    try:
        train(args)
    except (DataError, CheckpointError, LaunchError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
