"""Checkpoint -> engine bundle, verified against PyTorch before anything is left on disk.

Everything is written into a temp folder beside the output; only when the parity gate passes are the files moved
into place (engine and sidecars first, manifest last), so a failed or interrupted export leaves no engine behind.
Per precision (see ``make_engine``):

- ``fp32`` ``.onnx``: for T5, ORT's transformer optimizer plus the T5 attention fusion (``export.t5_attention``);
  else ORT's transformer optimizer alone, else ORT's offline basic level, else the plain graph: the first that
  passes the fp32 gate is kept, and each one passed over is reported on stderr with the reason;
- ``int8`` ``.onnx``: ONNX Runtime's quantizer recipes on the optimized fp32 graph (dynamic per-channel/per-tensor,
  int8 attention, static QDQ calibrated on the calibration set; ``export.quantize``), each measured for the gate and
  speed; the fastest that passes is kept, with the most harmful MatMuls stepped back to fp32 only where needed;
- ``fp16``/``bf16`` ``.onnx``: the fp32 graph with low-precision MatMuls and fp32 islands (``mixed_precision``);
- ``.plan``: TensorRT built from the fp32 or mixed-precision graph, which the bundle keeps as ``PATH.onnx``;
- ``.pt2``: ``torch.export`` + AOTInductor for the device it is exported on, fp16/bf16 with the same fp32 islands
  (``export.pt2``).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from export import mixed_precision, optimize, quantize
from export.manifest import build_manifest, engine_record, io_spec, onnx_record
from export.onnx_graph import DEFAULT_OPSET, export_onnx, ff_width
from export.parity import GATES, GateError, ParityReport, calibration_inputs, check_gate, compare, run_batches
from export.progress import Progress
from export.tensorrt import DEFAULT_TIMING_CACHE, Profile
from runtime.files.atomic import atomic_write_text
from runtime.bundle import (
    bundle_files,
    engine_kind,
    manifest_path,
    sha256_file,
    source_onnx_path,
    tokenizer_path,
)
from runtime.deps import MissingDependency, install_hint
from runtime.files.locks import ExclusiveLock, owned_temp_dir
from runtime.manifest_schema import PRECISIONS, PRECISIONS_BY_KIND, RECORD_KEY
from trainer.model import InstructorModel
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


class ExportError(RuntimeError):
    """The export cannot proceed as asked (e.g. ``--out`` is a folder); the message says why."""


class BundleExists(ExportError):
    """``--out`` names an existing bundle and ``--overwrite`` was not given."""


@dataclass
class ExportOptions:
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    gate: dict[str, float] = field(default_factory=dict)  # overrides of GATES[precision]
    calib_max_batch: int | None = None  # rows of max_seq_length tokens: 4 for .onnx, max_batch for .plan
    calib_batch_size: int = 16
    optimize: bool = True
    fuse_attention: bool = True  # T5: MultiHeadAttention with the shared position bias (export.t5_attention)
    per_channel: bool | None = None  # int8: None measures both granularities, the fastest that passes is kept
    max_batch: int = 32  # .plan profile
    opt_batch: int | None = None  # .plan profile; default max_batch // 2 (at least 1)
    opt_seq: int | None = None  # .plan profile; default min(128, max_seq_length)
    timing_cache: Path = DEFAULT_TIMING_CACHE
    reference_device: str = "cpu"  # where the fp32 PyTorch reference runs ("cuda" for large models on a GPU box)
    device: str = "auto"  # .pt2: the device it is compiled for (auto: cuda when torch sees a GPU, else cpu)
    overwrite: bool = False  # replace an existing bundle at the output path
    progress: Progress = field(default_factory=Progress)  # one line per step on stderr (Progress(False): silent)
    engines: tuple[str, ...] | None = None  # precision "auto": the CPU engines to build (None: all; export.auto)


def onnx_runner(path: Path, precision: str = "fp32") -> tuple[Runner, str]:
    """Run an ONNX file for the parity check and the int8 race: on ORT's CUDA EP when there is one, else the CPU
    (no bf16 there), with the session options the runtime serves it with (``runtime.backends.onnx``)."""
    import onnxruntime as ort

    from runtime.backends.onnx import OnnxOptions, _session_options

    provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"
    if precision == "bf16":
        require_bf16_provider()
    session = ort.InferenceSession(str(path), _session_options(OnnxOptions()), providers=[provider])
    return (lambda feats: session.run(None, feats)[0]), f"onnxruntime {ort.__version__} {provider}"


EngineResult = tuple[Path, ParityReport, dict[str, Any]]  # the engine file, its parity, extra manifest fields


class Verifier:
    """The PyTorch reference on the calibration set, computed once; ``check`` measures an engine against it.

    ``check`` runs the set in its own order, batches padded to their longest row (on MiniLM 14,304 positions for
    3,581 tokens), so that the gate also sees rows padded far past their length; every gate decision is taken by
    it. ``check(fast=True)`` runs the rows sorted by length, as the runtime batches them (on MiniLM about 4,000
    positions): the int8 sensitivity ranking measures with it. (The two differ for dynamic int8, whose activation
    ranges are taken over the whole batch, padding included.)
    """

    def __init__(self, model: InstructorModel, precision: str, gate: dict[str, float], long_rows: int, batch_size: int, device: str):
        self.model = model
        self.batch_size = batch_size
        self.inputs = calibration_inputs(model.max_seq_length, long_rows)
        self.reference = model.encode(self.inputs, batch_size=batch_size, device=device)
        model.to("cpu")
        self.reference_name = f"pytorch fp32 ({device})"
        self.gate = {**GATES[precision], **gate}
        lengths = model.tokenizer(self.inputs)["attention_mask"].sum(axis=1)
        self.by_length = np.argsort(lengths, kind="stable")

    def feeds(self, by_length: bool = False) -> list[dict[str, np.ndarray]]:
        """The calibration set as the engine's input batches (int8 calibration; ``by_length``: the speed race)."""
        tok = self.model.tokenizer
        rows = [self.inputs[i] for i in self.by_length] if by_length else self.inputs
        return [tok(rows[i : i + self.batch_size]) for i in range(0, len(rows), self.batch_size)]

    def check(self, runner: Runner, runner_name: str, fast: bool = False) -> ParityReport:
        if fast:
            rows = [self.inputs[i] for i in self.by_length]
            candidate = np.empty_like(self.reference)
            candidate[self.by_length] = run_batches(runner, self.model.tokenizer, rows, self.batch_size)
        else:
            candidate = run_batches(runner, self.model.tokenizer, self.inputs, self.batch_size)
        parity = compare(self.reference, candidate)
        return ParityReport(parity, self.reference_name, runner_name, self.batch_size, dict(self.gate), tuple(check_gate(parity, self.gate)))


def _fp32_onnx(model: InstructorModel, base: Path, workdir: Path, opts: ExportOptions, verifier: Verifier) -> EngineResult:
    rejected = []
    progress = opts.progress
    if opts.optimize:
        for label, make in optimize.candidates(model, base, workdir, opts.fuse_attention):
            try:
                with progress.step(f"graph candidate {label!r}: optimize"):
                    cand = make()
            except Exception as exc:  # an optimizer that cannot handle the graph is skipped, and said so
                rejected.append({"candidate": label, "reason": f"failed: {exc}"})
                _fallback_message(label, rejected[-1]["reason"])
                continue
            with progress.step(f"graph candidate {label!r}: parity vs PyTorch"):
                report = verifier.check(*onnx_runner(cand.path))
            if report.passed:
                return cand.path, report, {"graph": {**cand.info, "rejected": rejected}}
            rejected.append({"candidate": label, "reason": "; ".join(report.failures)})
            _fallback_message(label, f"parity gate: {rejected[-1]['reason']}")
    with progress.step("plain graph: parity vs PyTorch"):
        report = verifier.check(*onnx_runner(base))
    return base, report, {"graph": {"applied": "none", "rejected": rejected}}


def _fallback_message(label: str, reason: str) -> None:
    """Say on stderr that a graph candidate was passed over and the next (less fused) one is tried."""
    print(f"export: graph candidate {label!r} not used ({reason}); falling back to the next candidate", file=sys.stderr)


def _race(runners: dict[str, Runner], verifier: Verifier, rounds: int = 3) -> dict[str, float]:
    """Median seconds over the calibration set in length-sorted batches (as the runtime batches), the candidates
    taking turns each round (a load that drifts during the export then weighs on all of them alike)."""
    feeds = verifier.feeds(by_length=True)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            for f in feeds:
                runner(f)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def _int8_onnx(model: InstructorModel, base: Path, workdir: Path, opts: ExportOptions, verifier: Verifier) -> EngineResult:
    """Measure every int8 recipe on the gate-checked fp32 graph and keep the fastest that passes the gate.

    Every recipe is quantized with all encoder MatMuls in int8 and checked; if none passes, the MatMuls are ranked
    by the damage each does alone (with the recipe of the highest min cosine) and the most harmful are kept fp32,
    the fewest that pass found by bisection. The fp32 graph and every passing candidate then race (turns, median
    of 3 rounds over the calibration set) and the fastest is kept; the manifest records all of it. The ranking
    measures each MatMul with the length-sorted check (``Verifier.check(fast=True)``, about a third of the work);
    every candidate that can be kept is measured by the full check, the gate's.
    """
    fp32_verifier = copy.copy(verifier)
    fp32_verifier.gate = dict(GATES["fp32"])
    progress = opts.progress
    fp32_graph, _, fp32_extra = _fp32_onnx(model, base, workdir, opts, fp32_verifier)
    with progress.step("int8: shape inference for the quantizer"):
        src = quantize.prepare(fp32_graph, workdir / "int8.src.onnx")
    measured: list[dict[str, Any]] = []
    candidates: dict[str, tuple[Path, ParityReport, dict[str, Any]]] = {}  # label -> (path, report, info)

    def attempt(recipe: quantize.Recipe) -> ParityReport:
        path = workdir / f"int8.{len(measured)}.onnx"
        t0 = time.monotonic()
        info = quantize.quantize(src, path, recipe, verifier.feeds)
        t1 = time.monotonic()
        report = verifier.check(*onnx_runner(path))
        progress.note(
            f"int8 {recipe.label}: min cos {report.min_cos:.5f}, {'passes' if report.passed else 'fails'} the gate "
            f"(quantize{' with calibration' if recipe.method == 'static' else ''} {t1 - t0:.1f} s, parity {time.monotonic() - t1:.1f} s)"
        )
        measured.append({"recipe": recipe.label, "min_cosine": report.min_cos, "mean_cosine": report.parity.mean_cos, "passed": report.passed})
        candidates[recipe.label] = (path, report, info)
        return report

    full = {recipe: attempt(recipe) for recipe in quantize.recipes(src, opts.per_channel)}
    sensitivity: dict[str, float] = {}
    if not any(r.passed for r in full.values()):
        recipe = max(full, key=lambda r: full[r].min_cos)
        names = quantize.weight_matmuls(src)
        progress.note(f"int8: no recipe passes with every MatMul in int8; the damage of each of {len(names)} MatMuls alone ({recipe.label})")
        for i, name in enumerate(names, 1):  # each MatMul alone in int8
            t0 = time.monotonic()
            alone = quantize.Recipe(recipe.method, recipe.per_channel, keep_fp32=tuple(n for n in names if n != name))
            path = workdir / "int8.alone.onnx"
            quantize.quantize(src, path, alone, verifier.feeds)
            t1 = time.monotonic()
            sensitivity[name] = 1.0 - verifier.check(*onnx_runner(path), fast=True).min_cos
            progress.note(f"int8 sensitivity {i}/{len(names)} {name}: damage {sensitivity[name]:.5f} "
                          f"(quantize {t1 - t0:.1f} s, parity {time.monotonic() - t1:.1f} s)")
        order = quantize.sensitivity_order(sensitivity)
        low, high = 1, len(order)  # bisect the fewest fp32 MatMuls (most harmful first) that pass the gate
        while low < high:
            k = (low + high) // 2
            report = attempt(quantize.Recipe(recipe.method, recipe.per_channel, recipe.attention, tuple(order[:k])))
            low, high = (low, k) if report.passed else (k + 1, high)
    passing = {label: c for label, c in candidates.items() if c[1].passed}
    graph_extra: dict[str, Any] = {"fp32_graph": fp32_extra["graph"], "measured": measured}
    if sensitivity:
        graph_extra["sensitivity"] = {"damage": "1 - min cosine with only this MatMul in int8 (rows in length-sorted batches)", "matmuls": sensitivity}
    if not passing:
        path, report, info = max(candidates.values(), key=lambda c: c[1].min_cos)  # for the gate's message
        return path, report, {"graph": {**info, **graph_extra}}
    with progress.step(f"int8: speed race of fp32 and {len(passing)} passing candidate(s), 3 rounds"):
        seconds = _race({FP32_LABEL: onnx_runner(src)[0], **{label: onnx_runner(c[0])[0] for label, c in passing.items()}}, verifier)
    for m in measured:
        m["calibration_set_seconds"] = seconds.get(m["recipe"])
    measured.insert(0, {"recipe": FP32_LABEL, "calibration_set_seconds": seconds[FP32_LABEL]})
    path, report, info = passing[min(passing, key=seconds.get)]
    return path, report, {"graph": {**info, **graph_extra}}


FP32_LABEL = "fp32 (not quantized)"


def make_engine(model: InstructorModel, workdir: Path, out: Path, opts: ExportOptions, verifier: Verifier) -> EngineResult:
    """Write the engine for ``opts.precision`` into ``workdir``; return (path, parity report, extra manifest fields)."""
    progress = opts.progress
    if engine_kind(out) == "pt2":
        from export.pt2 import make_pt2_engine

        metadata = {RECORD_KEY: engine_record(model, opts.precision)}
        with progress.step(".pt2: torch.export, AOTInductor compile (minutes) and parity vs PyTorch"):
            return make_pt2_engine(model, workdir, out, opts.precision, opts.device, verifier, metadata=metadata)
    with progress.step("ONNX export (torch.onnx)"):
        base = export_onnx(model, workdir / "fp32.onnx", opts.opset)
    ff = ff_width(model.auto_model.config)
    if engine_kind(out) == "tensorrt":
        from export.tensorrt import build_plan, plan_backend

        src = workdir / source_onnx_path(out).name
        info: dict[str, Any] = {"applied": "none"}
        if opts.precision == "fp32":
            base.rename(src)
        else:
            with progress.step(f"{opts.precision}: mixed-precision graph"):
                info = mixed_precision.convert(base, src, opts.precision, ff)
        engine = workdir / out.name
        with progress.step("TensorRT build (minutes; the timing cache makes rebuilds fast)"):
            extra = build_plan(src, engine, _profile(model, opts), opts.timing_cache, tf32=opts.precision != "fp32")
        backend, runner_name = plan_backend(engine, extra["tensorrt"], io_spec(model))
        try:
            with progress.step("TensorRT engine: parity vs PyTorch"):
                report = verifier.check(backend.run, runner_name)
        finally:
            backend.close()
        extra.update(graph=info, source_onnx={"file": src.name, "sha256": sha256_file(src)})
        return engine, report, extra
    if opts.precision == "fp32":
        return _fp32_onnx(model, base, workdir, opts, verifier)
    if opts.precision == "int8":
        return _int8_onnx(model, base, workdir, opts, verifier)
    path = workdir / f"{opts.precision}.onnx"
    with progress.step(f"{opts.precision}: mixed-precision graph"):
        info = mixed_precision.convert(base, path, opts.precision, ff)
    with progress.step(f"{opts.precision}: parity vs PyTorch"):
        report = verifier.check(*onnx_runner(path, opts.precision))
    return path, report, {"graph": info}


def _profile(model: InstructorModel, opts: ExportOptions) -> Profile:
    profile = Profile(
        max_batch=opts.max_batch,
        opt_batch=opts.opt_batch or max(1, opts.max_batch // 2),
        max_seq=model.max_seq_length,
        opt_seq=opts.opt_seq or min(128, model.max_seq_length),
    )
    profile.check()
    return profile


def _check_dependencies(kind: str, precision: str, device: str = "auto") -> None:
    """Before the slow part: say what to install if this export cannot be built or verified here."""
    if kind == "tensorrt":
        from export.tensorrt import require_tensorrt

        require_tensorrt()
    elif kind == "pt2":
        from export.pt2 import resolve_device

        resolve_device(device)
    elif precision == "bf16":
        require_bf16_provider()


def require_bf16_provider() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise MissingDependency(
            "bf16 ONNX engines run on ONNX Runtime's CUDA EP and this onnxruntime has only the CPU EP, so the export "
            f"cannot be verified here: install onnxruntime-gpu ({install_hint('gpu')}) or export a .plan"
        )


def check_output(out: Path, overwrite: bool) -> None:
    """Fail before the (long) export if the bundle could not, or should not, be written at ``out``."""
    if out.is_dir():
        raise ExportError(f"{out}: a folder; --out names the engine file to write, e.g. {out / ('NAME' + out.suffix if out.suffix else 'NAME.onnx')}")
    existing = [p for p in bundle_files(out) if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing)
        raise BundleExists(f"{out}: a bundle is already there ({names}); pass --overwrite to replace it")
    folders = [p for p in existing if p.is_dir()]
    if folders:
        raise ExportError(f"{folders[0]}: a folder where the bundle puts a file; move it away")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:  # the errno decides the exit code (3 for permissions, a read-only or full disk)
        raise type(exc)(exc.errno, f"cannot write the engine there ({exc.strerror})", str(out.parent)) from exc


def lock_path(out: Path) -> Path:
    """The lock file that one export to ``out`` holds for its whole run."""
    return Path(f"{out}.lock")


def export_bundle(checkpoint: str | Path, out: str | Path, opts: ExportOptions | None = None) -> dict[str, Any]:
    """Export ``checkpoint`` to the bundle at ``out`` and return its manifest; ``GateError`` if parity fails.

    Checked before anything slow: the kind and precision, the dependencies, and the output (not a folder, no
    bundle there unless ``opts.overwrite``, writable). One export at a time per output (``PATH.lock``: ``LockHeld``).
    """
    opts = opts or ExportOptions()
    if opts.precision == "auto":  # every CPU engine that passes its gate, in one bundle
        from export.auto import export_auto_bundle

        return export_auto_bundle(checkpoint, out, opts)
    progress = opts.progress
    out = Path(out)
    kind = engine_kind(out)
    if opts.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {opts.precision!r} (choose from {', '.join(PRECISIONS)})")
    if opts.precision not in PRECISIONS_BY_KIND[kind]:
        raise ValueError(f"{opts.precision} engines are ONNX Runtime CPU engines: use --out NAME.onnx")
    check_output(out, opts.overwrite)
    _check_dependencies(kind, opts.precision, opts.device)
    with ExclusiveLock(lock_path(out), str(out)):
        check_output(out, opts.overwrite)  # again, now that no other export can write there
        with progress.step(f"load checkpoint {checkpoint}"):
            model = InstructorModel.from_pretrained(checkpoint)
        plan = kind == "tensorrt"
        batch_size = min(opts.calib_batch_size, opts.max_batch) if not plan else opts.max_batch
        long_rows = opts.calib_max_batch or (opts.max_batch if plan else 4)
        with progress.step(f"PyTorch fp32 reference on the calibration set ({opts.reference_device})"):
            verifier = Verifier(model, opts.precision, opts.gate, long_rows, batch_size, opts.reference_device)
        with owned_temp_dir(out.parent, f".{out.name}.tmp-") as workdir:  # also removes those of killed earlier runs
            engine, report, extra = make_engine(model, workdir, out, opts, verifier)
            if not report.passed:
                raise GateError(
                    f"{out}: parity gate failed for {opts.precision}: {'; '.join(report.failures)} (no engine written)"
                )
            if engine.name != out.name:
                engine = engine.rename(workdir / out.name)
            if kind == "onnx":
                onnx_record(engine, model, opts.precision)
            manifest = build_manifest(model, checkpoint, engine, opts.precision, kind, report.as_dict(), extra)
            shutil.copyfile(model.tokenizer.path, workdir / tokenizer_path(out).name)
            moves = [(engine, out), (workdir / tokenizer_path(out).name, tokenizer_path(out))]
            onnx_src = workdir / source_onnx_path(out).name
            if plan:
                moves.append((onnx_src, source_onnx_path(out)))
            manifest_path(out).unlink(missing_ok=True)  # an old manifest must never describe a new engine
            for src, dst in moves:
                src.replace(dst)
            atomic_write_text(manifest_path(out), json.dumps(manifest, indent=2) + "\n")
    progress.note(f"wrote {out}")
    return manifest
