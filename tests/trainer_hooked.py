"""``python -m tests.trainer_hooked nan-loss@RANK:STEP ARGS...``: ``python -m trainer`` with one process's loss made NaN.

The tests' way to make a single process of a DDP run diverge at an exact step without a hook in production code:
the training step of process RANK returns NaN at its STEP-th call, after its real forward and backward (so every
collective of that step still runs). Launch it like the trainer: ``accelerate launch ... -m tests.trainer_hooked``.
"""

from __future__ import annotations

import os
import sys

import trainer.loop as loop
from trainer.__main__ import main


def _hook(rank: int, step: int) -> None:
    real, calls = loop.contrastive_step, []

    def patched(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls.append(loss)
        return float("nan") if len(calls) == step and int(os.environ.get("RANK", "0")) == rank else loss

    loop.contrastive_step = patched


if __name__ == "__main__":
    action, _, where = sys.argv[1].partition("@")
    assert action == "nan-loss", action
    rank, _, step = where.partition(":")
    _hook(int(rank), int(step))
    sys.exit(main(sys.argv[2:]))
