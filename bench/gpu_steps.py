"""``python -m bench.gpu_steps --out DIR``: GPU throughput (docs/hour, MFU) and batch-1 latency of TensorRT plans.

For one model shape (default: instructor-large's, seeded random weights) and each precision (fp16, bf16):
build the ``.plan`` with the exporter (its parity gate runs and is recorded in the manifest), then with
``runtime.Encoder`` on the GPU:
- throughput at 128 and 512 tokens per text (texts of exactly that many tokens), median of ``--repeats`` passes
  after a warm-up pass: docs/s, docs/hour, and MFU = useful FLOP/s (real tokens only, as ``bench.throughput``
  counts them) over the card's dense fp16/bf16 tensor-core peak (table below, or ``--peak-tflops``);
- batch-1 latency p50/p95/p99 at the same lengths.
Writes ``DIR/gpu_steps.json``. Meant for ``bench/gpu_check.sh`` on a lent GPU machine; without CUDA/TensorRT it
exits 2 with the reason.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Workspace, environment, flop_model, timed, write_json

# Dense (no sparsity) fp16/bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s.
PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_steps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_steps.json (e.g. $OUT)")
    p.add_argument("--shape", default="large", choices=("tiny", "base", "large"), help="model shape. Default: large")
    p.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], help="plan precisions. Default: fp16 bf16")
    p.add_argument("--tokens", nargs="+", type=int, default=[128, 512], help="tokens per text. Default: 128 512")
    p.add_argument("--docs-tokens", type=int, default=2_097_152, help="real tokens per timed pass (docs = this / tokens). Default: 2097152")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (median reported). Default: 3")
    p.add_argument("--max-batch", type=int, default=256, help="plan profile max batch and encode batch size. Default: 256")
    p.add_argument("--latency-iters", type=int, default=200, help="batch-1 calls per length. Default: 200")
    p.add_argument("--peak-tflops", type=float, help="the card's dense fp16/bf16 peak; default from the table by GPU name")
    p.add_argument("--checkpoint", type=Path, help="the checkpoint the plans come from (default: made here with bench.shapes)")
    p.add_argument("--plan", action="append", default=[], metavar="PRECISION=PATH", help="reuse a plan built earlier (e.g. by gpu_check.sh's export step) instead of building one; repeatable")
    p.add_argument("--workdir", type=Path, default=Path("results/gpu-work"), help="checkpoints and plans")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=False)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def peak_for(name: str | None) -> float | None:
    """Longest table key contained in the GPU name (``NVIDIA H100 80GB HBM3`` -> the SXM figure)."""
    if not name:
        return None
    hits = [k for k in PEAK_TFLOPS if k.lower() in name.lower()]
    return PEAK_TFLOPS[max(hits, key=len)] if hits else None


def build_plan(ws: Workspace, ckpt: Path, shape: str, precision: str, max_batch: int, given: dict[str, Path]) -> Path:
    from export.build import ExportOptions, export_bundle
    from runtime.bundle import manifest_path

    if precision in given:
        return given[precision]
    path = ws.root / f"{shape}-{precision}.plan"
    if not manifest_path(path).is_file():
        export_bundle(ckpt, path, ExportOptions(precision=precision, max_batch=max_batch, opt_batch=max_batch, calib_max_batch=4))
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = gpu_name()
    if name is None:
        print("error: no NVIDIA GPU found (nvidia-smi missing or failing); bench.gpu_steps needs CUDA and TensorRT", file=sys.stderr)
        return 2
    peak = args.peak_tflops or peak_for(name)
    given = {}
    for spec in args.plan:
        precision, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            print(f"error: --plan {spec!r}: expected PRECISION=PATH of an existing plan", file=sys.stderr)
            return 2
        given[precision] = Path(path)
    from bench.latency import percentiles, texts_of_length
    from runtime import Encoder
    from trainer.model import InstructorModel

    ws = Workspace(args.workdir, args.seed)
    ckpt = args.checkpoint or ws.checkpoint(args.shape)
    reference = InstructorModel.from_pretrained(ckpt)  # CPU: tokenizer and FLOP count only
    fm = flop_model(reference)
    report: dict[str, Any] = {
        "gpu": name,
        "peak_tflops_dense": peak,
        "shape": args.shape,
        "checkpoint": str(ckpt),
        "flop_model": fm.as_dict(),
        "environment": environment(),
        "results": [],
    }
    for precision in args.precisions:
        t0 = time.perf_counter()
        plan = build_plan(ws, ckpt, args.shape, precision, args.max_batch, given)
        enc = Encoder(plan, device="cuda")
        profile = enc.manifest.data.get("tensorrt", {}).get("profile", {}).get("input_ids", {})
        batch = min(args.max_batch, profile.get("max", [args.max_batch])[0])  # a reused plan may allow fewer rows
        entry: dict[str, Any] = {
            "precision": precision,
            "plan": str(plan),
            "build_s": time.perf_counter() - t0,
            "batch": batch,
            "parity": enc.manifest.data.get("parity"),
        }
        for n_tokens in args.tokens:
            one = texts_of_length(reference.tokenizer, reference.architecture, n_tokens, 8)
            docs = [one[i % len(one)] for i in range(max(batch, args.docs_tokens // n_tokens))]
            flops = fm.flops(reference.tokenizer.encode(docs).lengths)
            budget = batch * n_tokens  # full batches of `batch` rows, not the runtime's CPU-sized default

            def run() -> None:
                enc.encode(docs, batch_size=batch, max_tokens=budget)

            run()  # warm-up
            secs = [timed(run) for _ in range(args.repeats)]
            med = statistics.median(secs)
            lat = [timed(lambda: enc.encode(one[:1], batch_size=1)) for _ in range(args.latency_iters)]
            row = {
                "tokens": n_tokens,
                "docs": len(docs),
                "seconds_all": secs,
                "docs_per_s": len(docs) / med,
                "docs_per_hour": 3600 * len(docs) / med,
                "useful_tflops": flops / med / 1e12,
                "mfu": flops / med / 1e12 / peak if peak else None,
                "padding_waste": enc.last_stats.padding_waste,
                "batch1_latency": percentiles(lat[5:]),
            }
            entry[str(n_tokens)] = row
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            print(
                f"{precision} {n_tokens} tok: {row['docs_per_hour'] / 1e6:.2f} M docs/hour, MFU {mfu}, "
                f"batch-1 p50 {row['batch1_latency']['p50_ms']:.2f} ms",
                file=sys.stderr,
            )
        report["results"].append(entry)
        enc.close()
    write_json(args.out / "gpu_steps.json", report)
    print(f"wrote {args.out / 'gpu_steps.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
