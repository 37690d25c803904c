"""``python -m bench.throughput``: docs/s of the runtime (each precision) against the reference path, same run.

Contenders per model, on the same checkpoint and the same corpus:
- ``reference``: ``trainer.InstructorModel.encode`` (PyTorch fp32; equals ``InstructorEmbedding==1.0.1``);
- ``runtime-<precision>``: ``runtime.Encoder`` on an engine exported from that checkpoint (fp32, int8, ...);
- ``sentence-transformers``: when installed, ``SentenceTransformer`` on the same folder with
  ``Pooling(include_prompt=False)`` and the instruction as ``prompt`` (plain text for MiniLM).
Each contender encodes the whole corpus once to warm up, then all contenders run in turn, ``--repeats`` rounds
(the order rotates each round so no one always runs first on a warm cache); the figure is the median round.
Reported: docs/s, real tokens/s, padding waste, ratio to the reference, useful GFLOP/s (FLOPs of real tokens only:
2 x matmul weights x tokens + attention's QK^T and AV) and its share of an fp32 sgemm peak measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.common import (
    MODELS,
    Workspace,
    environment,
    flop_model,
    load_corpus,
    padded_tokens_sorted,
    publish,
    sgemm_peak,
    timed,
    with_instruction,
)

PRECISIONS = ("fp32", "int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["base", "minilm"], choices=MODELS, help="model shapes (seeded random T5) and/or the real MiniLM. Default: base minilm")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), help="runtime engine precisions. Default: fp32 int8")
    p.add_argument("--data", nargs="*", default=[], help="data folders (DATA_DIR, the layout of docs/evaluation.md) or .jsonl/.txt files; none: built-in corpus")
    p.add_argument("--docs", type=int, default=1000, help="texts in the corpus. Default: 1000")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported). Default: 5")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for every contender. Default: 32")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0: all cores). Default: 0")
    p.add_argument("--no-st", action="store_true", help="leave sentence-transformers out")
    p.add_argument("--workdir", type=Path, default=Path("results/bench-work"), help="cache of checkpoints and engines. Default: results/bench-work")
    p.add_argument("--out", type=Path, default=Path("results/throughput.json"), help="JSON results; the PNG goes beside it. Default: results/throughput.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-weight shapes and of the corpus sample. Default: 0")
    return p.parse_args(argv)


def contenders(model_name: str, ws: Workspace, precisions: list[str], threads: int, use_st: bool, batch_size: int):
    """(name, encode(items) -> stats or None) for every contender available for this model."""
    import torch

    from trainer.model import InstructorModel

    ckpt = ws.checkpoint(model_name)
    reference = InstructorModel.from_pretrained(ckpt)
    if threads:
        torch.set_num_threads(threads)
    out: list[tuple[str, Callable[[list[Any]], Any]]] = [("reference", lambda items: reference.encode(items, batch_size=batch_size))]
    from runtime import Encoder

    for precision in precisions:
        engine = ws.engine(model_name, precision)
        if engine is None:
            continue
        enc = Encoder(engine, intra_op_threads=threads)

        def run(items: list[Any], enc: Any = enc) -> Any:
            enc.encode(items, batch_size=batch_size)
            return enc.last_stats

        out.append((f"runtime-{precision}", run))
    if use_st:
        st = sentence_transformers_model(ckpt)
        if st is not None:
            out.append(("sentence-transformers", st(batch_size)))
    return reference, out


def sentence_transformers_model(ckpt: Path) -> Callable[[int], Callable[[list[Any]], Any]] | None:
    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.models import Pooling
    except ImportError:
        return None
    model = SentenceTransformer(str(ckpt), device="cpu")
    for module in model:
        if isinstance(module, Pooling):
            module.include_prompt = False

    def make(batch_size: int) -> Callable[[list[Any]], Any]:
        def run(items: list[Any]) -> None:
            if items and isinstance(items[0], list):  # one instruction for the whole corpus (see with_instruction)
                model.encode([x for _, x in items], prompt=items[0][0], batch_size=batch_size)
            else:
                model.encode(items, batch_size=batch_size)

        return run

    return make


def bench_model(model_name: str, docs: list[str], args: argparse.Namespace, ws: Workspace, peak: float) -> dict[str, Any]:
    reference, runs = contenders(model_name, ws, args.precisions, args.threads, not args.no_st, args.batch_size)
    items = with_instruction(docs, reference.architecture)
    encoded = reference.tokenizer.encode(items)
    lengths = encoded.lengths
    flops = flop_model(reference).flops(lengths)
    stats: dict[str, Any] = {}
    for name, run in runs:  # warm-up, and the runtime's own padding counts
        stats[name] = run(items)
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for r in range(args.repeats):
        shift = r % len(runs)
        for name, run in runs[shift:] + runs[:shift]:
            times[name].append(timed(lambda: run(items)))
    results = {}
    ref_median = statistics.median(times["reference"])
    for name, _ in runs:
        med = statistics.median(times[name])
        runtime_stats = stats[name] if hasattr(stats[name], "padding_waste") else None
        padded = runtime_stats.padded_tokens if runtime_stats else padded_tokens_sorted(lengths, args.batch_size)
        results[name] = {
            "seconds_median": med,
            "seconds_all": times[name],
            "docs_per_s": len(items) / med,
            "tokens_per_s": float(lengths.sum()) / med,
            "padding_waste": 1.0 - float(lengths.sum()) / padded,
            "ratio_to_reference": ref_median / med,
            "useful_gflops": flops / med / 1e9,
            "share_of_sgemm_peak": flops / med / 1e9 / peak,
        }
    return {
        "checkpoint": str(ws.checkpoint(model_name)),
        "architecture": reference.architecture,
        "flop_model": flop_model(reference).as_dict(),
        "docs": len(items),
        "tokens": int(lengths.sum()),
        "tokens_mean": float(lengths.mean()),
        "tokens_p50_p95_max": [float(np.percentile(lengths, 50)), float(np.percentile(lengths, 95)), int(lengths.max())],
        "useful_gflop_per_pass": flops / 1e9,
        "contenders": results,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import os

        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    ws = Workspace(args.workdir, args.seed)
    docs, corpus_note = load_corpus(args.data, args.docs, args.seed)
    env = environment()
    peak = sgemm_peak()
    print(f"sgemm peak: {peak['gflops_best']:.1f} GFLOP/s (fp32, numpy {peak['n']}x{peak['n']})", file=sys.stderr)
    report: dict[str, Any] = {"environment": env, "sgemm": peak, "corpus": corpus_note, "batch_size": args.batch_size, "repeats": args.repeats, "models": {}}
    for model_name in args.models:
        print(f"== {model_name}", file=sys.stderr)
        report["models"][model_name] = bench_model(model_name, docs, args, ws, peak["gflops_best"])
        for name, r in report["models"][model_name]["contenders"].items():
            print(
                f"{model_name:7s} {name:22s} {r['docs_per_s']:9.1f} docs/s  {r['tokens_per_s']:10.0f} tok/s  "
                f"x{r['ratio_to_reference']:.2f}  pad {r['padding_waste']:.1%}  {r['useful_gflops']:.1f} GFLOP/s "
                f"({r['share_of_sgemm_peak']:.0%} of sgemm)",
                file=sys.stderr,
            )
    report["skipped"] = ws.notes
    from bench.plots import throughput_chart

    publish(report, args.out, throughput_chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
