"""GPU step of ``bench/gpu_check.sh``: build fp16/bf16 TensorRT plans and record their parity gates as JSON.

Plans: the tiny fixture and the fp16 overflow fixture (fp32, fp16, bf16: the parity that matters), and random-weight
base and large T5 shapes (fp16, bf16). Also a naive all-fp16 plan of the overflow fixture (ORT's
``convert_float_to_float16``), which should give NaN/inf rows where the project's plan does not. Each result is
appended to ``--out`` as soon as it is known, so a step cut short by its time limit still leaves what it measured.
``--dry-run`` (no CUDA/TensorRT): the same checkpoints, and fp16 ONNX exports on the CPU instead of plans.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

from bench.shapes import TINY_FIXTURE, make_checkpoint, make_overflow_checkpoint

PLANS = [  # (checkpoint, precisions, export options)
    ("tiny", ("fp32", "fp16", "bf16"), {"max_batch": 32}),
    ("overflow", ("fp16", "bf16"), {"max_batch": 32}),
    ("base", ("fp16", "bf16"), {"max_batch": 32, "calib_max_batch": 8}),
    ("large", ("fp16", "bf16"), {"max_batch": 32, "calib_max_batch": 8}),
]


def gpu_available() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return False, f"tensorrt not importable ({exc})"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    return True, ""


def checkpoint(name: str, workdir: Path) -> Path:
    if name == "tiny":
        return TINY_FIXTURE
    folder = workdir / "checkpoints" / name
    if not (folder / "modules.json").is_file():
        if name == "overflow":
            make_overflow_checkpoint(folder)
        else:
            make_checkpoint(name, folder, seed=0)
    return folder


def export_one(ckpt: Path, out: Path, precision: str, options: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from export.build import ExportOptions, export_bundle
    from export.parity import GateError

    reference = "cuda" if out.suffix == ".plan" else "cpu"
    opts = ExportOptions(precision=precision, timing_cache=workdir / "timing.cache", reference_device=reference, **options)
    start = time.perf_counter()
    try:
        manifest = export_bundle(ckpt, out, opts)
    except GateError as exc:
        return {"status": "gate_failed", "error": str(exc), "seconds": round(time.perf_counter() - start, 1)}
    parity = manifest["parity"]
    return {
        "status": "passed",
        "seconds": round(time.perf_counter() - start, 1),
        "engine_bytes": manifest["engine"]["bytes"],
        "parity": {k: parity[k] for k in ("rows", "min_cosine", "mean_cosine", "max_abs_diff", "nonfinite_rows", "gate", "runner", "reference")},
        "tensorrt": manifest.get("tensorrt"),
        "graph": {k: v for k, v in manifest.get("graph", {}).items() if k in ("applied", "low_precision", "casts")},
    }


def naive_fp16_plan(ckpt: Path, workdir: Path) -> dict[str, Any]:
    """All-fp16 plan (no fp32 islands) of ``ckpt``: how many calibration rows come out NaN/inf."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from export.build import Verifier
    from export.manifest import io_spec
    from export.onnx_graph import export_onnx
    from export.tensorrt import Profile, build_plan, plan_backend
    from trainer.model import InstructorModel

    model = InstructorModel.from_pretrained(ckpt)
    fp32 = export_onnx(model, workdir / "naive.fp32.onnx")
    naive = workdir / "naive.fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(naive))
    plan = workdir / "naive.fp16.plan"
    fields = build_plan(naive, plan, Profile(32, 16, model.max_seq_length, 128), workdir / "timing.cache", tf32=True)
    verifier = Verifier(model, "fp16", {}, 4, 16, "cuda")
    backend, name = plan_backend(plan, fields["tensorrt"], io_spec(model))
    try:
        report = verifier.check(backend.run, name)
    finally:
        backend.close()
    return {"status": "measured", "expect": "nonfinite_rows > 0 or gate failed", **{k: report[k] for k in ("rows", "nonfinite_rows", "min_cosine", "passed")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_parity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file of results (rewritten after every engine)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gpu_check"), help="checkpoints, engines, timing cache")
    p.add_argument("--shapes", nargs="+", default=[name for name, _, _ in PLANS], help="which of tiny overflow base large")
    p.add_argument("--dry-run", action="store_true", help="no GPU: fp16 ONNX on the CPU instead of plans")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ok, why = gpu_available()
    results: dict[str, Any] = {"gpu": ok, "why_not": why or None, "dry_run": args.dry_run, "engines": {}}
    if not ok and not args.dry_run:
        results["status"] = "skipped"
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"gpu_parity: skipped ({why})")
        return 0
    suffix = ".plan" if ok and not args.dry_run else ".onnx"

    def record(key: str, value: dict[str, Any]) -> None:
        results["engines"][key] = value
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{key}: {value.get('status')} {json.dumps(value.get('parity', value.get('error', '')))[:300]}", flush=True)

    for name, precisions, options in PLANS:
        if name not in args.shapes:
            continue
        ckpt = checkpoint(name, args.workdir)
        for precision in precisions:
            if suffix == ".onnx" and precision == "bf16":
                continue  # ORT's CPU EP has no bf16
            key = f"{name}-{precision}{suffix}"
            try:
                record(key, export_one(ckpt, args.workdir / key, precision, options if suffix == ".plan" else {}, args.workdir))
            except Exception as exc:  # keep going: one broken build must not hide the others' figures
                record(key, {"status": "error", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]})
        if name == "overflow" and suffix == ".plan":
            try:
                record("overflow-naive-fp16.plan", naive_fp16_plan(ckpt, args.workdir))
            except Exception as exc:
                record("overflow-naive-fp16.plan", {"status": "error", "error": f"{type(exc).__name__}: {exc}"})
    results["status"] = "done"
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(v["status"] in ("passed", "measured") for v in results["engines"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
