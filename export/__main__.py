"""``python -m export CHECKPOINT --out PATH [--precision ...]``: see ``--help``."""

from __future__ import annotations

import argparse
import sys

from export.build import PRECISIONS, ExportOptions, export_bundle
from export.parity import GATES, GateError
from runtime.bundle import EngineError
from trainer.checkpoint import CheckpointError

DESCRIPTION = """\
Export an INSTRUCTOR (or BERT-family sentence-transformers) checkpoint to an engine bundle.

The engine kind follows the extension of --out: .onnx (ONNX Runtime) or .plan (TensorRT).
Beside PATH the bundle holds PATH.manifest.json (what the engine is, and the parity measured here)
and PATH.tokenizer.json; a .plan also keeps PATH.onnx, the graph it was built from.
Every export is checked against the PyTorch model on a calibration set before it is kept: below the
gate the command exits 1 and leaves no engine behind.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="sentence-transformers folder (hkunlp INSTRUCTOR layout, or e.g. all-MiniLM-L6-v2)")
    p.add_argument("--out", required=True, help="engine path: NAME.onnx or NAME.plan")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (ONNX Runtime graph-optimized), int8 (dynamic MatMul quantization, CPU), "
        "fp16/bf16 (GPU; residual stream, norms, FF output and pooling kept in fp32). Default: fp32",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17). Default: 17")
    p.add_argument("--min-cos", type=float, help="gate: minimum per-row cosine vs PyTorch (default by precision: %s)" % {k: v.get("min_cos") for k, v in GATES.items() if "min_cos" in v})
    p.add_argument("--max-abs", type=float, help="gate: maximum abs diff vs PyTorch (default: 1e-5 for fp32)")
    p.add_argument("--calib-max-batch", type=int, default=4, help="rows of max_seq_length tokens in the calibration set. Default: 4")
    p.add_argument("--no-optimize", action="store_true", help="skip ONNX Runtime's transformer graph optimizer")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.opset < 17:
        print("error: --opset must be >= 17", file=sys.stderr)
        return 2
    gate = {}
    if args.min_cos is not None:
        gate["min_cos"] = args.min_cos
    if args.max_abs is not None:
        gate["max_abs"] = args.max_abs
    opts = ExportOptions(
        precision=args.precision, opset=args.opset, gate=gate, calib_max_batch=args.calib_max_batch, optimize=not args.no_optimize
    )
    try:
        manifest = export_bundle(args.checkpoint, args.out, opts)
    except GateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, EngineError, FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    par = manifest["parity"]
    print(
        f"wrote {args.out} ({manifest['engine']['bytes'] / 2**20:.1f} MiB, {manifest['precision']}, dim {manifest['embedding_dim']}); "
        f"parity vs PyTorch on {par['rows']} rows: min cos {par['min_cosine']:.6f}, max abs {par['max_abs_diff']:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
