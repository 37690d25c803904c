"""``python -m bench.speed.latency``: p50/p95/p99 milliseconds per ``encode`` call, by batch size and text length.

Each call encodes ``batch`` texts of exactly ``tokens`` tokens (instruction, text and ``</s>`` together), so the
figures are per shape, not per corpus. Timed end to end (tokenizing included), after ``--warmup`` calls; the
runtime engines and the PyTorch reference run on the same model in the same process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.common import MODELS, Workspace, environment, publish, with_instruction

BATCHES = (1, 8, 32)
LENGTHS = (32, 128, 512)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.speed.latency", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base", choices=MODELS, help="model shape (seeded random T5) or the real MiniLM. Default: base")
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8"], help="runtime engine precisions. Default: fp32 int8")
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="batch sizes. Default: 1 8 32")
    p.add_argument("--tokens", nargs="+", type=int, default=list(LENGTHS), help="tokens per text. Default: 32 128 512")
    p.add_argument("--iters", type=int, default=50, help="timed calls per cell. Default: 50")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per cell first. Default: 5")
    p.add_argument("--max-seconds", type=float, default=30.0, help="stop a cell's timed calls after this long (at least 5 calls). Default: 30")
    p.add_argument("--no-reference", action="store_true", help="time the runtime engines only")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores). Default: 0")
    p.add_argument("--device", default=None, help="runtime device: cpu or cuda (engines of kind .onnx). Default: the runtime's choice")
    p.add_argument("--workdir", type=Path, default=Path("results/bench-work"), help="cache of checkpoints and engines")
    p.add_argument("--out", type=Path, default=Path("results/latency.json"), help="JSON results; the PNG goes beside it")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def texts_of_length(tokenizer: Any, architecture: str, n_tokens: int, count: int) -> list[Any]:
    """``count`` distinct inputs that tokenize to exactly ``n_tokens`` (checked), instruction included for T5.

    Built from words that are one token each in T5's and BERT's vocabularies, so the length is linear in the
    word count; the check below makes sure of it.
    """
    words = ["the", "of", "and", "to", "in", "is", "for", "on"]

    def item(i: int, k: int) -> Any:
        return with_instruction([" ".join(words[(i + j) % len(words)] for j in range(k))], architecture)[0]

    overhead = int(tokenizer.encode([item(0, 1)]).lengths[0]) - 1
    if n_tokens - overhead < 1:
        raise ValueError(f"cannot build a text of {n_tokens} tokens: instruction and special tokens take {overhead}")
    out = [item(i, n_tokens - overhead) for i in range(count)]
    got = sorted(set(tokenizer.encode(out).lengths.tolist()))
    if got != [n_tokens]:
        raise ValueError(f"built texts of {got} tokens, wanted {n_tokens}")
    return out


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "calls": len(ms)}


def measure(fn: Callable[[], Any], iters: int, warmup: int, max_seconds: float) -> list[float]:
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < iters and (len(samples) < 5 or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from runtime import Encoder
    from trainer.model import InstructorModel

    ws = Workspace(args.workdir, args.seed)
    reference = InstructorModel.from_pretrained(ws.checkpoint(args.model))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    runs: list[tuple[str, Callable[[list[Any]], Any]]] = []
    if not args.no_reference:
        runs.append(("reference", lambda items: reference.encode(items, batch_size=len(items))))
    for precision in args.precisions:
        engine = ws.engine(args.model, precision)
        if engine is not None:
            enc = Encoder(engine, device=args.device, intra_op_threads=args.threads) if args.device != "cuda" else Encoder(engine, device="cuda")
            runs.append((f"runtime-{precision}", lambda items, enc=enc: enc.encode(items, batch_size=len(items))))
    max_len = reference.max_seq_length
    results = []
    for n_tokens in args.tokens:
        if n_tokens > max_len:
            print(f"skip {n_tokens} tokens: the model's max_seq_length is {max_len}", file=sys.stderr)
            continue
        pool = texts_of_length(reference.tokenizer, reference.architecture, n_tokens, max(args.batches))
        for batch in args.batches:
            items = pool[:batch]
            for name, run in runs:
                stats = percentiles(measure(lambda: run(items), args.iters, args.warmup, args.max_seconds))
                results.append({"contender": name, "batch": batch, "tokens": n_tokens, **stats})
                print(f"{name:16s} batch {batch:3d} x {n_tokens:3d} tok: p50 {stats['p50_ms']:8.2f} ms  p95 {stats['p95_ms']:8.2f}  p99 {stats['p99_ms']:8.2f}", file=sys.stderr)
    report = {"model": args.model, "environment": environment(), "iters": args.iters, "warmup": args.warmup, "results": results, "skipped": ws.notes}
    from bench.plots import latency_chart

    publish(report, args.out, latency_chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
