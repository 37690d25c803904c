"""``python -m export CHECKPOINT --out PATH [--precision ...]``: see ``--help``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.build import BundleExists, ExportError, ExportOptions, export_bundle
from export.parity import GATES, GateError
from export.progress import Progress
from export.tensorrt import DEFAULT_TIMING_CACHE
from runtime.bundle import EngineError
from runtime.deps import MissingDependency
from runtime.exit_codes import ENVIRONMENT, EPILOG, INPUT, USAGE, run_cli
from runtime.files.locks import LockHeld
from runtime.manifest_schema import PRECISIONS
from trainer.checkpoint import CheckpointError

DESCRIPTION = """\
Export an INSTRUCTOR (or BERT-family sentence-transformers) checkpoint to an engine bundle.

The engine kind follows the extension of --out: .onnx (ONNX Runtime), .plan (TensorRT: built and verified on
an NVIDIA GPU with TensorRT) or .pt2 (torch.export + AOTInductor: compiled for the --device it is exported on,
runs with that torch version only). Beside PATH the bundle holds PATH.manifest.json (what the engine is, and
the parity measured here; sealed, so that an edit is refused at load) and PATH.tokenizer.json; a .plan also
keeps PATH.onnx, the graph it was built from. An existing bundle is replaced only with --overwrite.
Every export is checked against the PyTorch model on a calibration set (golden probes, real sentences,
and rows of max_seq_length tokens) before it is kept: below the gate the command exits 1 (the checkpoint
does not survive this precision) and leaves no engine behind. Each step prints a line with its time on stderr.

precisions (--precision):
  fp32  .onnx graph-optimized for ONNX Runtime (kept only if it still passes the fp32 gate); .plan, .pt2 in fp32
  int8  .onnx for the CPU: ONNX Runtime quantizer recipes (dynamic, int8 attention, static QDQ calibrated on the
        calibration set) measured in turn; the fastest that passes the gate is kept (manifest: graph.measured)
  fp16  .onnx (ORT CUDA EP; ORT's CPU EP runs it too), .plan or .pt2: MatMuls in fp16, with the residual
        stream, norms, softmax, FF output (wo) and pooling in fp32
  bf16  as fp16 with bfloat16 (a .onnx needs onnxruntime-gpu to be verified; a .pt2 also builds for the CPU)
  auto  .onnx for the CPU: the fp32 engine plus every other CPU engine that passes its gate (ONNX Runtime int8;
        OpenVINO f32, bf16 where the CPU has native bf16, NNCF int8), raced here; the runtime runs the fastest
        on the CPU it finds (measured there once if it is another CPU). Manifest: cpu_engines
"""

EXPORT_EPILOG = (
    f"{EPILOG}. For this command: 1 also when the engine misses the parity gate (the checkpoint's vectors do not "
    "survive the precision) or the checkpoint's files are unreadable; 2 an existing bundle without --overwrite, "
    "--out a folder, bad options; 3 no GPU or TensorRT for a .plan, a missing package, another export writing the "
    "same --out."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description=DESCRIPTION,
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("checkpoint", help="sentence-transformers folder (hkunlp INSTRUCTOR layout, or e.g. all-MiniLM-L6-v2)")
    p.add_argument("--out", required=True, help="engine path: NAME.onnx, NAME.plan or NAME.pt2 (a file, not a folder)")
    p.add_argument("--overwrite", action="store_true", help="replace the bundle already at --out (refused otherwise)")
    p.add_argument("--precision", choices=(*PRECISIONS, "auto"), default="fp32",
                   help="engine precision; what each means: 'precisions' in the description above. Default: fp32")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17). Default: 17")
    p.add_argument(
        "--min-cos",
        type=float,
        help="gate: minimum per-row cosine vs PyTorch (default by precision: %s)"
        % {k: v["min_cos"] for k, v in GATES.items() if "min_cos" in v},
    )
    p.add_argument("--max-abs", type=float, help="gate: maximum abs diff vs PyTorch (default: 1e-5 for fp32)")
    p.add_argument(
        "--calib-max-batch",
        type=int,
        help="rows of max_seq_length tokens in the calibration set. Default: 4 for .onnx, --max-batch for .plan",
    )
    p.add_argument("--no-optimize", action="store_true", help="fp32 .onnx: skip ONNX Runtime's graph optimizers")
    p.add_argument(
        "--no-fuse-attention",
        action="store_true",
        help="T5 .onnx (fp32, int8): keep the attention as plain ops instead of MultiHeadAttention with the shared "
        "position bias (the RMSNorm fusions stay); for comparison. A fusion that does not match or misses the gate "
        "falls back to this graph by itself, with a message",
    )
    p.add_argument(
        "--int8-weights",
        choices=("auto", "per-channel", "per-tensor"),
        default="auto",
        help="int8: weight scale granularity; auto measures both and keeps the fastest that passes the gate. Default: auto",
    )
    p.add_argument(
        "--reference-device",
        default="cpu",
        help="device of the fp32 PyTorch reference for the parity check (e.g. cuda; TF32 stays off). Default: cpu",
    )
    p.add_argument(
        "--device",
        default="auto",
        help=".pt2: the device the engine is compiled for and will run on: cpu, cuda or cuda:N "
        "(auto: cuda when torch sees a GPU, else cpu). Default: auto",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr (errors are still printed)")
    p.add_argument("--debug", action="store_true", help="on an internal error, print the traceback to stderr")
    p.add_argument("--engines", nargs="+", metavar="ENGINE",
                   help="--precision auto: build only these CPU engines (onnxruntime-fp32 always; onnxruntime-int8, "
                        "openvino-f32, openvino-bf16, openvino-int8). Default: all")
    trt = p.add_argument_group(".plan (TensorRT) options")
    trt.add_argument("--max-batch", type=int, default=32, help="largest batch the engine accepts. Default: 32")
    trt.add_argument("--opt-batch", type=int, help="batch size TensorRT tunes for. Default: max-batch / 2")
    trt.add_argument("--opt-seq", type=int, help="sequence length TensorRT tunes for. Default: min(128, max_seq_length)")
    trt.add_argument(
        "--timing-cache",
        type=Path,
        default=DEFAULT_TIMING_CACHE,
        help=f"persistent TensorRT timing cache (read and updated). Default: {DEFAULT_TIMING_CACHE}",
    )
    return p.parse_args(argv)


# Most specific first: CheckpointError is a ValueError, BundleExists an ExportError.
KNOWN = {
    GateError: INPUT,
    CheckpointError: INPUT,
    LockHeld: ENVIRONMENT,
    MissingDependency: ENVIRONMENT,
    BundleExists: USAGE,
    ExportError: USAGE,
    EngineError: USAGE,
    ValueError: USAGE,
}


def run(args: argparse.Namespace) -> int:
    """The export itself; every failure is an exception that ``run_cli`` turns into its exit code."""
    if args.opset < 17:
        raise ExportError("--opset must be >= 17")
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        what = "not found" if not checkpoint.exists() else "not a folder"
        raise ExportError(f"{checkpoint}: {what}; the checkpoint is a sentence-transformers folder")
    gate = {}
    if args.min_cos is not None:
        gate["min_cos"] = args.min_cos
    if args.max_abs is not None:
        gate["max_abs"] = args.max_abs
    opts = ExportOptions(
        precision=args.precision,
        opset=args.opset,
        gate=gate,
        calib_max_batch=args.calib_max_batch,
        optimize=not args.no_optimize,
        fuse_attention=not args.no_fuse_attention,
        per_channel={"auto": None, "per-channel": True, "per-tensor": False}[args.int8_weights],
        max_batch=args.max_batch,
        opt_batch=args.opt_batch,
        opt_seq=args.opt_seq,
        timing_cache=args.timing_cache,
        reference_device=args.reference_device,
        device=args.device,
        overwrite=args.overwrite,
        progress=Progress(enabled=not args.quiet),
        engines=tuple(args.engines) if args.engines else None,
    )
    manifest = export_bundle(checkpoint, args.out, opts)
    par = manifest["parity"]
    print(
        f"wrote {args.out} ({manifest['engine']['bytes'] / 2**20:.1f} MiB, {manifest['precision']}, dim {manifest['embedding_dim']}); "
        f"parity vs PyTorch ({par['runner']}) on {par['rows']} rows: min cos {par['min_cosine']:.6f}, "
        f"mean cos {par['mean_cosine']:.6f}, max abs {par['max_abs_diff']:.2e}"
    )
    if "cpu_engines" in manifest:
        from export.auto import summary_line

        print(summary_line(manifest))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args), prog="python -m export", known=KNOWN, debug=args.debug,
                   os_hint="no engine was written", on_interrupt="interrupted; no engine was written")


if __name__ == "__main__":
    sys.exit(main())
