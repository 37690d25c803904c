"""``python -m bench.speed.ort_profile``: where an ONNX engine's time goes, per op type, with ONNX Runtime's own profiler.

Runs the engine through ``runtime.Encoder`` (same batching, threads and session options as a real run) on a corpus
with ``enable_profiling`` on, then sums the profiler's node events by op type. Answers "why is engine X no faster":
which op types dominate, whether attention was fused (``Attention`` vs ``MatMul`` + ``Softmax``), how much time is
outside the GEMMs. Output: JSON (``--out``) and a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import environment, load_corpus, with_instruction, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.speed.ort_profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", type=Path, required=True, help="an .onnx engine bundle (python -m export ... --out NAME.onnx)")
    p.add_argument("--data", nargs="*", default=[], help="data folders (DATA_DIR) or .jsonl/.txt files; none: built-in corpus")
    p.add_argument("--docs", type=int, default=200, help="texts to encode. Default: 200")
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch. Default: 32")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core). Default: 0")
    p.add_argument("--out", type=Path, default=Path("results/ort_profile.json"), help="JSON output. Default: results/ort_profile.json")
    return p.parse_args(argv)


def op_times(trace: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Profiler events -> op type -> {ms, calls, share} (node ``*_kernel_time`` events only), largest first."""
    ms: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in trace:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            ms[op] += event.get("dur", 0) / 1000.0
            calls[op] += 1
    total = sum(ms.values()) or 1.0
    return {op: {"ms": ms[op], "calls": calls[op], "share": ms[op] / total} for op in sorted(ms, key=ms.get, reverse=True)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from runtime import Encoder

    enc = Encoder(args.engine, intra_op_threads=args.threads)
    docs, note = load_corpus(args.data, args.docs)
    items = with_instruction(docs, enc.manifest.data["architecture"])
    import onnxruntime as ort

    from runtime.backends.onnx import _session_options

    so = _session_options(enc.backend.options)
    so.enable_profiling = True
    so.profile_file_prefix = str(args.out.with_suffix(""))
    enc.backend.session = ort.InferenceSession(str(enc.manifest.engine), so, providers=["CPUExecutionProvider"])
    enc.encode(items, batch_size=args.batch_size)  # the first pass of a fresh session, as a new process runs it
    trace_file = Path(enc.backend.session.end_profiling())
    ops = op_times(json.loads(trace_file.read_text()))
    trace_file.unlink()
    report = {"environment": environment(), "engine": str(args.engine), "corpus": note, "batch_size": args.batch_size,
              "stats": vars(enc.last_stats), "ops": ops}
    write_json(args.out, report)
    for op, r in list(ops.items())[:15]:
        print(f"{op:32s} {r['ms']:9.1f} ms {r['calls']:6d} calls {r['share']:6.1%}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
