"""Checkpoint -> engine bundle, verified against PyTorch before anything is left on disk.

Everything is written into a temp folder beside the output; only when the parity gate passes are the files moved
into place (engine and sidecars first, manifest last), so a failed or interrupted export leaves no engine behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from export.manifest import build_manifest
from export.onnx_graph import DEFAULT_OPSET, export_onnx
from export.parity import GATES, GateError, calibration_inputs, check_gate, compare, run_batches
from runtime.bundle import (
    atomic_write_text,
    engine_kind,
    manifest_path,
    source_onnx_path,
    tokenizer_path,
)
from trainer.model import InstructorModel

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass
class ExportOptions:
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    gate: dict[str, float] = field(default_factory=dict)  # overrides of GATES[precision]
    calib_max_batch: int = 4
    calib_batch_size: int = 16
    optimize: bool = True


def onnx_runner(path: Path) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """Run an ONNX file on the CPU for the parity check."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda feats: session.run(None, feats)[0]


def make_engine(model: InstructorModel, workdir: Path, engine_name: str, opts: ExportOptions) -> tuple[Path, dict[str, Any]]:
    """Write the engine for ``opts.precision`` into ``workdir``; return its path and extra manifest fields."""
    fp32_path = export_onnx(model, workdir / "fp32.onnx", opts.opset)
    if opts.precision != "fp32":
        raise NotImplementedError(f"precision {opts.precision!r} is not available yet")
    engine = workdir / engine_name
    fp32_path.rename(engine)
    return engine, {}


def export_bundle(checkpoint: str | Path, out: str | Path, opts: ExportOptions | None = None) -> dict[str, Any]:
    """Export ``checkpoint`` to the bundle at ``out`` and return its manifest; ``GateError`` if parity fails."""
    opts = opts or ExportOptions()
    out = Path(out)
    kind = engine_kind(out)
    if opts.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {opts.precision!r} (choose from {', '.join(PRECISIONS)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = InstructorModel.from_pretrained(checkpoint)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        workdir = Path(tmp)
        engine, extra = make_engine(model, workdir, out.name, opts)
        runner = extra.pop("_runner", None) or onnx_runner(engine)
        inputs = calibration_inputs(model.max_seq_length, opts.calib_max_batch)
        reference = model.encode(inputs, batch_size=opts.calib_batch_size)
        candidate = run_batches(runner, model.tokenizer, inputs, opts.calib_batch_size)
        parity = compare(reference, candidate)
        gate = {**GATES[opts.precision], **opts.gate}
        failures = check_gate(parity, gate)
        report = {**parity.as_dict(), "reference": "pytorch fp32", "gate": gate, "passed": not failures}
        if failures:
            raise GateError(f"{out}: parity gate failed for {opts.precision}: {'; '.join(failures)} (no engine written)")
        manifest = build_manifest(model, checkpoint, engine, opts.precision, kind, report, extra)
        shutil.copyfile(model.tokenizer.path, workdir / tokenizer_path(out).name)
        moves = [(engine, out), (workdir / tokenizer_path(out).name, tokenizer_path(out))]
        onnx_src = workdir / source_onnx_path(out).name
        if kind == "tensorrt" and onnx_src.exists():
            moves.append((onnx_src, source_onnx_path(out)))
        manifest_path(out).unlink(missing_ok=True)  # an old manifest must never describe a new engine
        for src, dst in moves:
            src.replace(dst)
        atomic_write_text(manifest_path(out), json.dumps(manifest, indent=2) + "\n")
    return manifest
