"""``python -m bench.speed.gpu_build --out FILE CHECKPOINT ENGINE --precision P --device D``: one engine of
``bench/gpu_check.sh``, or the reason it cannot be built here.

A missing prerequisite is recorded as ``skipped`` with its reason instead of failing: ``.plan`` needs TensorRT and
cuda-python, an ``.onnx`` for the GPU onnxruntime's CUDA execution provider (onnxruntime-gpu), a ``.pt2`` for CUDA a
GPU visible to torch. Otherwise the engine is exported by ``export.build.export_bundle`` (its parity gate included)
and the build time and gate figures are written to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import write_json


def missing_prerequisite(engine: Path, device: str) -> str | None:
    """Why ``engine`` cannot be built or run on ``device`` here, or None; asked before the checkpoint is loaded, so
    that a skip costs no time (the exporter would refuse a ``.plan`` without TensorRT only after loading it, and
    would build and verify an fp16 ``.onnx`` on the CPU, which is not a GPU engine)."""
    if engine.suffix == ".plan" and importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (a .plan is built by TensorRT)"
    if engine.suffix == ".onnx" and device.startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"
    return None


def build(checkpoint: Path, engine: Path, precision: str, device: str) -> dict[str, Any]:
    from export.build import ExportOptions, export_bundle
    from export.parity import GateError
    from runtime.deps import MissingDependency

    why_not = missing_prerequisite(engine, device)
    if why_not:
        return {"status": "skipped", "reason": why_not}
    opts = ExportOptions(precision=precision, device=device, reference_device=device, calib_max_batch=4, max_batch=64)
    start = time.perf_counter()
    try:
        manifest = export_bundle(checkpoint, engine, opts)
    except MissingDependency as exc:
        return {"status": "skipped", "reason": str(exc)}
    except GateError as exc:
        return {"status": "gate_failed", "error": str(exc), "seconds": round(time.perf_counter() - start, 1)}
    parity = manifest["parity"]
    return {
        "status": "passed",
        "seconds": round(time.perf_counter() - start, 1),
        "compile_threads": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"),
        "engine_mib": round(manifest["engine"]["bytes"] / 2**20, 1),
        "export_gate": {k: parity.get(k) for k in ("rows", "min_cosine", "mean_cosine", "max_abs_diff", "nonfinite_rows", "gate", "passed", "runner", "reference")},
        "graph": {k: v for k, v in manifest.get("graph", {}).items() if k in ("applied", "low_precision", "fp32_matmuls", "casts")},
        **{k: manifest[k] for k in ("pt2", "tensorrt") if k in manifest},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.speed.gpu_build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="checkpoint folder (e.g. python -m bench.shapes large DIR)")
    p.add_argument("engine", type=Path, help="engine path: NAME.pt2, NAME.onnx or NAME.plan")
    p.add_argument("--out", type=Path, required=True, help="JSON file of the result")
    p.add_argument("--precision", default="fp16", help="engine precision. Default: fp16")
    p.add_argument("--device", default="cuda", help="device the engine is built for and verified on. Default: cuda")
    args = p.parse_args(argv)
    try:
        result = build(args.checkpoint, args.engine, args.precision, args.device)
    except Exception as exc:  # recorded, so that gpu_check.json says what broke
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    result = {"engine": str(args.engine), "precision": args.precision, "device": args.device, **result}
    write_json(args.out, result)
    print(f"{args.engine.name}: {result['status']} {result.get('reason') or result.get('error') or ''}", flush=True)
    return 0 if result["status"] in ("passed", "skipped") else 1


if __name__ == "__main__":
    raise SystemExit(main())
