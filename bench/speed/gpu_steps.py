"""``python -m bench.speed.gpu_steps --out FILE --checkpoint CKPT --engine NAME=PATH ...``: GPU throughput (docs/hour,
MFU) and batch-1 latency of engine bundles of one checkpoint, against the PyTorch reference in the same run.

For every engine (``.pt2``, ``.onnx`` or ``.plan``), with ``runtime.Encoder`` on ``--device`` and its default token
budget (GPU-sized on CUDA):
- throughput at each ``--tokens`` (texts of exactly that many tokens, instruction included): the median of
  ``--repeats`` passes after a warm-up pass; docs/s, docs/hour, the ratio to the reference, and MFU = useful FLOP/s
  (real tokens only, ``bench.common.flop_model``) over the card's dense fp16/bf16 tensor-core peak (the datasheet
  table below, or ``--peak-tflops``);
- batch-1 latency p50/p95/p99 at each ``--latency-tokens``, tokenizing included.
The reference is ``trainer.InstructorModel.encode`` in fp32 (TF32 off) on the same device, on an eighth of the docs.
An engine that cannot be opened here (no onnxruntime-gpu, no TensorRT, not built) is recorded as skipped with the
reason; results are written to ``--out`` after every engine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from bench.common import environment, flop_model, timed, write_json

# Dense (no sparsity) fp16/bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s.
PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.speed.gpu_steps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file of the results")
    p.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint the engines were exported from (tokenizer, FLOP count, reference)")
    p.add_argument("--engine", action="append", default=[], metavar="NAME=PATH", help="an engine bundle to measure; repeatable")
    p.add_argument("--device", default="cuda", help="device to run on. Default: cuda")
    p.add_argument("--tokens", nargs="+", type=int, default=[128, 512], help="tokens per text for throughput. Default: 128 512")
    p.add_argument("--latency-tokens", nargs="+", type=int, default=[32, 128], help="tokens per text for batch-1 latency. Default: 32 128")
    p.add_argument("--docs-tokens", type=int, default=524_288, help="real tokens per timed pass (docs = this / tokens). Default: 524288")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (median reported). Default: 3")
    p.add_argument("--latency-iters", type=int, default=100, help="timed batch-1 calls per length (after 5 warm-up calls). Default: 100")
    p.add_argument("--batch-size", type=int, default=1024, help="most rows per batch (the token budget binds first). Default: 1024")
    p.add_argument("--no-reference", action="store_true", help="leave the PyTorch reference out")
    p.add_argument("--peak-tflops", type=float, help="the card's dense fp16/bf16 peak; default from the table by GPU name")
    return p.parse_args(argv)


def gpu_name(device: str) -> str | None:
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.device(device))


def peak_for(name: str | None) -> float | None:
    """Longest table key contained in the GPU name (``NVIDIA H100 80GB HBM3`` -> the SXM figure)."""
    if not name:
        return None
    hits = [k for k in PEAK_TFLOPS if k.lower() in name.lower()]
    return PEAK_TFLOPS[max(hits, key=len)] if hits else None


def latency(call: Callable[[], Any], iters: int) -> dict[str, float]:
    from bench.speed.latency import measure, percentiles

    return percentiles(measure(call, iters, warmup=5, max_seconds=20.0))


def throughput(run: Callable[[list[Any]], Any], docs: list[Any], flops: float, repeats: int, peak: float | None) -> dict[str, Any]:
    run(docs)  # warm-up (first shapes, allocator)
    secs = [timed(lambda: run(docs)) for _ in range(repeats)]
    med = statistics.median(secs)
    return {
        "docs": len(docs),
        "seconds_all": secs,
        "docs_per_s": len(docs) / med,
        "docs_per_hour": 3600 * len(docs) / med,
        "useful_tflops": flops / med / 1e12,
        "mfu": flops / med / 1e12 / peak if peak else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.speed.latency import texts_of_length
    from runtime import Encoder
    from runtime.deps import MissingDependency
    from runtime.bundle import EngineError
    from trainer.model import InstructorModel

    name = gpu_name(args.device)
    peak = args.peak_tflops or peak_for(name)
    model = InstructorModel.from_pretrained(args.checkpoint)
    fm = flop_model(model)
    report: dict[str, Any] = {
        "device": args.device,
        "gpu": name,
        "peak_tflops_dense": peak,
        "checkpoint": str(args.checkpoint),
        "flop_model": fm.as_dict(),
        "environment": environment(),
        "results": {},
    }

    def save() -> None:
        write_json(args.out, report)

    docs_by_length = {}
    for n in sorted(set(args.tokens) | set(args.latency_tokens)):
        one = texts_of_length(model.tokenizer, model.architecture, n, 8)
        count = max(1, args.docs_tokens // n) if n in args.tokens else 8
        docs_by_length[n] = [one[i % len(one)] for i in range(count)]
    flops = {n: fm.flops(model.tokenizer.encode(d).lengths) for n, d in docs_by_length.items()}

    if not args.no_reference:
        model.to(args.device)
        entry: dict[str, Any] = {"what": "trainer.InstructorModel.encode, fp32", "batch_size": 128}
        report["results"]["reference"] = entry
        for n in args.tokens:
            docs = docs_by_length[n][: max(1, len(docs_by_length[n]) // 8)]
            share = flops[n] * len(docs) / len(docs_by_length[n])
            entry[str(n)] = throughput(lambda d: model.encode(d, batch_size=128), docs, share, args.repeats, peak)
            print(f"reference {n} tok: {entry[str(n)]['docs_per_hour'] / 1e6:.3f} M docs/hour", file=sys.stderr, flush=True)
            save()
        model.to("cpu")
        save()

    for spec in args.engine:
        label, _, path = spec.partition("=")
        t0 = time.perf_counter()
        try:
            enc = Encoder(path, device=args.device)
        except (EngineError, MissingDependency, FileNotFoundError) as exc:
            report["results"][label] = {"engine": path, "status": "skipped", "reason": str(exc)}
            print(f"{label}: skipped ({exc})", file=sys.stderr, flush=True)
            save()
            continue
        entry = {"engine": path, "status": "measured", "backend": enc.backend.name, "precision": enc.manifest.precision,
                 "load_s": round(time.perf_counter() - t0, 2), "max_tokens": enc.max_tokens}
        report["results"][label] = entry
        try:
            for n in args.tokens:
                row = throughput(lambda d: enc.encode(d, batch_size=args.batch_size), docs_by_length[n], flops[n], args.repeats, peak)
                row["padding_waste"] = enc.last_stats.padding_waste
                ref = report["results"].get("reference", {}).get(str(n))
                row["ratio_to_reference"] = row["docs_per_s"] / ref["docs_per_s"] if ref else None
                entry[str(n)] = row
                mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
                print(f"{label} {n} tok: {row['docs_per_hour'] / 1e6:.3f} M docs/hour, MFU {mfu}", file=sys.stderr, flush=True)
                save()
            for n in args.latency_tokens:
                one = docs_by_length[n][:1]
                entry[f"batch1_latency_{n}"] = lat = latency(lambda: enc.encode(one, batch_size=1), args.latency_iters)
                print(f"{label} batch-1 {n} tok: p50 {lat['p50_ms']:.2f} ms p99 {lat['p99_ms']:.2f} ms", file=sys.stderr, flush=True)
                save()
        except Exception as exc:  # a failing engine is a result; the others are still measured
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        finally:
            enc.close()
        save()
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(r.get("status") != "error" for r in report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
