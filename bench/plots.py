"""PNG charts of the benchmark JSON (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    _save(plt, fig, path)


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
    _save(plt, fig, path)


def quality_vs_size_chart(report: dict[str, Any], path: Path) -> None:
    """nDCG@10 against bytes per vector (log scale), one line per long-text mode (``bench.quality.long_docs``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (mode, info) in enumerate(report["modes"].items()):
        variants = info["variants"]
        names = sorted(variants, key=lambda n: variants[n]["bytes_per_vector"])
        xs = [variants[n]["bytes_per_vector"] for n in names]
        ys = [variants[n]["ndcg_at_10"] for n in names]
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=f"{mode} ({info['docs_per_s']:.0f} docs/s)")
        for x, y, n in zip(xs, ys, names):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per vector")
    ax.set_ylabel("SciFact nDCG@10")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def serve_chart(report: dict[str, Any], path: Path) -> None:
    """p50 latency against docs/s (``bench.speed.serve``): one line per server and items per request, points labelled N."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"runtime": "-", "naive": "--"}
    for si, (name, server) in enumerate(report["servers"].items()):
        for mi, m in enumerate(sorted({c["items_per_request"] for c in server["cells"]})):
            cells = sorted((c for c in server["cells"] if c["items_per_request"] == m and c["p50_ms"] is not None),
                           key=lambda c: c["clients"])
            xs, ys = [c["docs_per_s"] for c in cells], [c["p50_ms"] for c in cells]
            ax.plot(xs, ys, styles.get(name, ":"), marker="o", color=f"C{2 * si + mi}", label=f"{name}, {m} item(s)/request")
            for x, y, c in zip(xs, ys, cells):
                ax.annotate(f"N={c['clients']}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axvline(report["offline"]["docs_per_s"], color="k", linestyle=":", label="offline Encoder.encode")
    ax.set_xlabel("docs/s")
    ax.set_ylabel("p50 latency per request (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    start, end = report["environment"].get("loadavg_at_start"), report.get("loadavg_at_end")
    load = f" (load {start[0]:.1f} at start, {end[0]:.1f} at end)" if start and end else ""
    fig.suptitle(f"Serving, {report['environment']['cpu']}{load}", fontsize=9)
    _save(plt, fig, path)
