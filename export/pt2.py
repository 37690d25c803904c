"""Checkpoint -> ``.pt2`` engine: ``InstructorModel`` exported by ``torch.export`` and compiled by AOTInductor.

The engine is the ONNX engines' graph contract (inputs ``input_ids``, ``attention_mask``, ``instruction_count``
int64, output ``sentence_embedding`` float32 ``[batch, dim]``, instruction-masked pooling, Dense and L2 norm inside)
as compiled code for the device it is exported on (``--device cpu|cuda``), with dynamic batch (1..``MAX_BATCH``) and
sequence (1..``max_seq_length``) dimensions. fp16/bf16 rewrite the exported graph with the fp32 islands of
``export.precision_rule`` (``export.fx_precision``) and export it again before compiling.

AOTInductor (``torch._inductor.aoti_compile_and_package``), not a saved ``torch.export`` program compiled at load:
it compiles HF's T5 encoder, relative position bias and mask code included, with both dimensions dynamic, and the
tiny fixture's package reproduces the golden vectors of InstructorEmbedding 1.0.1 (tests/test_pt2.py), so the
compile cost is paid once at export and a process that loads the engine starts at once.

The package is tied to the torch build, the device kind and (on CUDA) the GPU architecture: the manifest's ``pt2``
field records them and ``runtime.backends.pt2`` refuses a package elsewhere.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from export import fx_precision
from export.onnx_graph import ff_width
from export.parity import ParityReport
from runtime.backends.pt2 import Pt2Backend, build_target
from runtime.bundle import INPUT_NAMES, Manifest
from runtime.deps import MissingDependency
from trainer.model import InstructorModel

MAX_BATCH = 1024  # rows per engine call; the runtime's batch planner stays under it (the manifest's pt2.max_batch)
EXAMPLE_ROWS, EXAMPLE_TOKENS = 32, 128  # the compile's example batch: its sizes are the hints kernels are tuned for


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; a CUDA device must be usable here."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MissingDependency(
            f"--device {device}: torch {torch.__version__} sees no usable CUDA GPU (a .pt2 is compiled for the device "
            "it is exported on: export on the GPU machine, or use --device cpu)"
        )
    return device


def compile_example(model: InstructorModel, rows: int = EXAMPLE_ROWS, tokens: int = EXAMPLE_TOKENS) -> tuple[torch.Tensor, ...]:
    """``rows`` inputs padded to ``tokens`` (at most ``max_seq_length``): the sizes the engine serves, not a toy batch,
    since AOTInductor tunes its kernels for the example's sizes. Every other row carries an instruction and the
    lengths vary, so the tracer sees every branch; the longest row fills the padded width."""
    width = min(tokens, model.max_seq_length)
    instruction = "Represent the sentence for retrieval: "
    overhead = int(model.tokenizer.encode([[instruction, "the"]]).lengths[0]) - 1
    items: list[Any] = []
    for i in range(rows):
        room = width - 1 - (overhead if i % 2 else 0)  # words that fit with </s> (and the instruction)
        words = max(1, room - (i * 7) % max(1, room // 2))
        text = " ".join(["the"] * words)  # one T5 / BERT token a word
        items.append([instruction, text] if i % 2 else text)
    feats = model.tokenizer(items)
    return tuple(torch.from_numpy(feats[name]) for name in INPUT_NAMES)


def export_program(model: InstructorModel, device: str, precision: str) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The model as a ``torch.export`` program on ``device`` with dynamic batch and sequence, in ``precision``."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    sequence = torch.export.Dim("sequence", min=1, max=model.max_seq_length)
    dims = ({0: batch, 1: sequence}, {0: batch, 1: sequence}, {0: batch})
    example = tuple(t.to(device) for t in compile_example(model))
    with torch.no_grad():
        program = torch.export.export(model, example, dynamic_shapes=dims, strict=False)
        if precision == "fp32":
            return program, {"applied": "none"}
        module = program.module()
        info = fx_precision.convert(module, precision, ff_width(model.auto_model.config))
        return torch.export.export(module, example, dynamic_shapes=dims, strict=False), info


def compile_package(program: torch.export.ExportedProgram, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """AOTInductor-compile ``program`` into the package file ``path``; ``metadata`` is stored in the package
    (the engine record of ``export.manifest``, read back by ``runtime.backends.pt2``)."""
    configs = {"aot_inductor.metadata": dict(metadata)} if metadata else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations inside the compiler, not ours to fix
        return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs))


def pt2_backend(path: Path, fields: dict[str, Any], device: str) -> tuple[Pt2Backend, str]:
    """The runtime's own backend on a fresh package (what is verified is what will be served)."""
    backend = Pt2Backend(Manifest(engine=path, data={"pt2": fields}), device)
    return backend, f"torch-aoti {fields['torch']} {fields['device']} (runtime.backends.pt2)"


def make_pt2_engine(
    model: InstructorModel, workdir: Path, out: Path, precision: str, device: str, verifier: Any,
    metadata: dict[str, str] | None = None,
) -> tuple[Path, ParityReport, dict[str, Any]]:
    """Export, compile and verify the ``.pt2``; return (path, parity report, extra manifest fields)."""
    if precision == "int8":
        raise ValueError("int8 engines are ONNX Runtime CPU engines: use --out NAME.onnx")
    device = resolve_device(device)
    t0 = time.perf_counter()
    model.to(device)
    try:
        program, graph = export_program(model, device, precision)
    finally:
        model.to("cpu")
    t1 = time.perf_counter()
    engine = compile_package(program, workdir / out.name, metadata)
    t2 = time.perf_counter()
    fields = {
        "format": "aoti",
        **build_target(device),
        "inputs": list(INPUT_NAMES),
        "max_batch": MAX_BATCH,
        "max_seq_length": model.max_seq_length,
        "tf32_islands": precision != "fp32" and device.startswith("cuda"),
        "export_seconds": round(t1 - t0, 1),
        "compile_seconds": round(t2 - t1, 1),
    }
    backend, runner_name = pt2_backend(engine, fields, device)
    try:
        report = verifier.check(backend.run, runner_name)
    finally:
        backend.close()
    return engine, report, {"pt2": fields, "graph": graph}
