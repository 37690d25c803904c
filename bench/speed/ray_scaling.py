"""Ray Data scaling on this machine: docs/s of the single-process CLI and of ``--ray`` with 1..N local workers.

Same engine, same input, one run each after a warm-up, in one process (one local Ray cluster for every Ray run;
its start-up is not counted). Writes JSON (and prints a table)::

    python -m bench.speed.ray_scaling --engine m.onnx --input docs.jsonl --workers 1 2 --out results/ray_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.common import write_json
from runtime import encode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.speed.ray_scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, help="an .onnx (CPU) or .plan bundle")
    p.add_argument("--input", required=True, type=Path, help="a .jsonl/.txt/.parquet corpus")
    p.add_argument("--text-field", default="text")
    p.add_argument("--instruction", default=None)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="actor counts to measure (default: 1 2)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per worker (default: 1)")
    p.add_argument("--span-bytes", type=int, default=64 << 20,
                   help="input bytes per read task (smaller: more parallel blocks on a small corpus; default 64 MiB)")
    p.add_argument("--rows-per-call", type=int, default=1024, help="rows per actor call (default: 1024)")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported (default: 3)")
    p.add_argument("--out", type=Path, default=Path("results/ray_scaling.json"))
    return p.parse_args(argv)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from runtime.job import EncodeJob, RayOptions

    results: dict[str, object] = {"engine": args.engine, "input": str(args.input), "cpus": os.cpu_count(),
                                  "span_bytes": args.span_bytes, "rows_per_call": args.rows_per_call,
                                  "threads_per_worker": args.threads, "repeats": args.repeats, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        def single() -> dict:
            out = Path(tmp) / "single.npy"
            argv = ["--engine", args.engine, "--input", str(args.input), "--output", str(out), "--quiet",
                    "--overwrite", "--threads", str(args.threads * max(args.workers)), "--text-field", args.text_field]
            if args.instruction:
                argv += ["--instruction", args.instruction]
            start = time.perf_counter()
            assert encode.main(argv) == 0
            elapsed = time.perf_counter() - start
            summary = json.loads(Path(f"{out}.summary.json").read_text())
            return {"rows": summary["rows"], "elapsed_s": elapsed}

        single()  # warm-up: page cache, ORT kernels
        runs = [single() for _ in range(args.repeats)]
        rows = runs[0]["rows"]
        secs = _median([r["elapsed_s"] for r in runs])
        results["runs"].append({"mode": "single-process CLI", "workers": 1, "docs_per_s": rows / secs, "elapsed_s": secs})
        ray.init(num_cpus=max(os.cpu_count() or 1, max(args.workers) + 1), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        try:
            for workers in args.workers:
                times = []
                for k in range(args.repeats + 1):
                    start = time.perf_counter()
                    job = EncodeJob(args.engine, args.input, Path(tmp) / "ray", text_field=args.text_field,
                                    instruction=args.instruction, threads=args.threads, overwrite=True, quiet=True,
                                    ray=RayOptions(num_workers=workers, span_bytes=args.span_bytes,
                                                   rows_per_call=args.rows_per_call))
                    summary = encode.run(job)
                    if k:  # the first run warms the workers' imports
                        times.append(time.perf_counter() - start)
                secs = _median(times)
                results["runs"].append({"mode": "ray", "workers": workers, "docs_per_s": summary.rows / secs,
                                        "elapsed_s": secs})
        finally:
            ray.shutdown()
    write_json(args.out, results)
    for run in results["runs"]:
        print(f"{run['mode']:>20}  workers={run['workers']}  {run['docs_per_s']:8.1f} docs/s  ({run['elapsed_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
