"""What a person reads during and after training: a JSON-lines log per step and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class StepLog:
    """Appends one JSON object per optimizer step; on resume, drops the lines of steps after the checkpoint.

    A line a kill cut in half (or any line that is not a step record) is dropped too: the log is rewritten from
    the steps the checkpoint holds, so a torn line never stops a resume.
    """

    def __init__(self, path: str | Path, resume_step: int = 0) -> None:
        self.path = Path(path)
        kept = []
        if resume_step and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                step = _step_of(line)
                if step is not None and step <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _step_of(line: str) -> int | None:
    """The step of a log line, or None for a torn or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_log(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(log_path: str | Path, png_path: str | Path, smooth: int = 20) -> None:
    """Loss per step (and its running mean over ``smooth`` steps) and the learning rate, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= smooth:
        mean = [sum(losses[i - smooth + 1 : i + 1]) / smooth for i in range(smooth - 1, len(losses))]
        ax.plot(steps[smooth - 1 :], mean, lw=1.6, label=f"running mean ({smooth} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("contrastive loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="gray", lw=0.8, ls="--", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
