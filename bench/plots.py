"""PNG charts of the benchmark JSON (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_chart(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: docs/s per model, one bar per contender, labelled with the ratio to the reference."""
    plt = _pyplot()
    models = list(report["models"])
    names = sorted({c for m in models for c in report["models"][m]["contenders"]}, key=lambda n: (n != "reference", n))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        res = report["models"][model]["contenders"]
        shown = [n for n in names if n in res]
        bars = ax.bar(range(len(shown)), [res[n]["docs_per_s"] for n in shown], color=[f"C{names.index(n)}" for n in shown])
        for bar, n in zip(bars, shown):
            ax.annotate(f"x{res[n]['ratio_to_reference']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{model} ({report['models'][model]['tokens_mean']:.0f} tok/doc)")
        ax.set_ylabel("docs/s")
    fig.suptitle(f"CPU throughput, batch {report['batch_size']}, median of {report['repeats']} ({report['environment']['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latency_chart(report: dict[str, Any], path: Path) -> None:
    """One panel per batch size: p50 bars with p95/p99 markers, per sequence length and contender."""
    plt = _pyplot()
    rows = report["results"]
    batches = sorted({r["batch"] for r in rows})
    contenders = sorted({r["contender"] for r in rows})
    lengths = sorted({r["tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
    width = 0.8 / max(len(contenders), 1)
    for ax, batch in zip(axes[0], batches):
        for ci, name in enumerate(contenders):
            sel = {r["tokens"]: r for r in rows if r["batch"] == batch and r["contender"] == name}
            xs = [i + ci * width for i, n in enumerate(lengths) if n in sel]
            p = [sel[n] for n in lengths if n in sel]
            ax.bar(xs, [r["p50_ms"] for r in p], width, label=name, color=f"C{ci}")
            ax.scatter(xs, [r["p95_ms"] for r in p], marker="_", color="k", s=40)
            ax.scatter(xs, [r["p99_ms"] for r in p], marker="x", color="k", s=15)
        ax.set_xticks([i + width * (len(contenders) - 1) / 2 for i in range(len(lengths))], [str(n) for n in lengths])
        ax.set_xlabel("tokens per text")
        ax.set_ylabel("ms per call (bar p50, - p95, x p99)")
        ax.set_yscale("log")
        ax.set_title(f"batch {batch}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Latency, {report['model']} ({report['environment']['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
