"""``--precision auto``: every CPU engine that passes its gate, raced on this CPU, in one bundle.

``python -m export CKPT --out NAME.onnx --precision auto`` builds, from one checkpoint:

| engine | what | gate (vs PyTorch fp32) |
|---|---|---|
| ``onnxruntime-fp32`` | the fp32 ONNX engine, ``NAME.onnx`` itself (``export.build``'s fp32 path) | max abs <= 1e-5 |
| ``onnxruntime-int8`` | ONNX Runtime's int8 recipes, the fastest that passes (``export.build``'s int8 path) | min cos >= 0.99 |
| ``openvino-f32`` | the model as OpenVINO IR (``export.openvino.to_ir``), f32 inference | max abs <= 1e-5 |
| ``openvino-bf16`` | the same IR, bf16 inference; only where the CPU has native bf16 | min cos >= 0.999 |
| ``openvino-int8`` | NNCF static int8 of the IR's per-token linear layers (transformer preset, attention and the Dense projection float, the recipes of ``export.openvino.INT8_LADDER`` in turn), bf16 around it where the CPU has native bf16, else f32 | min cos >= 0.99 |

Every gate runs on the calibration set **and** on held-out sentences (``export/data/validation.json``) that no
static range was calibrated on. An engine that fails, or cannot be built here (OpenVINO or NNCF not installed, no
native bf16), is not kept, and the manifest and stderr say which and why. The kept engines race on the calibration
set as the encoder runs them (``runtime.cpu_engines.race``: turns, median of 3, each at the batch's own width and at
widths rounded up to 16, the faster rule kept as the engine's ``length_multiple``) and the manifest records the race
with this CPU's model name, vector flags and thread count, so a runtime on this machine picks the fastest without
measuring. The fp32 PyTorch vectors of the gate's rows go into the bundle (``NAME.onnx.cpu.reference.npz``): on
another CPU the runtime re-checks each engine's gate against them before it races them (``runtime.cpu_engines``).

``NAME.onnx`` is the ONNX Runtime fp32 engine, so the bundle runs wherever an ``.onnx`` does (a GPU, a light install
without OpenVINO); the manifest's ``precision`` is that engine's, ``fp32``.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from export.parity import GATES, GateError, ParityReport
from runtime import cpu_engines
from runtime.bundle import Manifest, sha256_file

ENGINES = ("onnxruntime-fp32", "onnxruntime-int8", "openvino-f32", "openvino-bf16", "openvino-int8")
PRECISION = {"onnxruntime-fp32": "fp32", "onnxruntime-int8": "int8", "openvino-f32": "fp32", "openvino-bf16": "bf16",
             "openvino-int8": "int8"}
VALIDATION_FILE = Path(__file__).parent / "data" / "validation.json"


def file_name(out: Path, suffix: str) -> str:
    """A candidate file of the bundle at ``out``: ``NAME.onnx.cpu.SUFFIX``."""
    return f"{out.name}{cpu_engines.FILE_INFIX}{suffix}"


def validation_inputs() -> list[str]:
    """Held-out sentences (``export/data/validation.json``): never calibrated on, gated on."""
    return list(json.loads(VALIDATION_FILE.read_text(encoding="utf-8"))["sentences"])


def held_out_verifier(verifier: Any) -> Any:
    """A verifier over the held-out rows, their PyTorch vectors computed once.

    Static int8 ranges are calibrated on the calibration set; gating them there alone lets ranges through that fit
    only those rows (measured: NNCF static int8 of MiniLM, min cos 0.997 on the calibration set, 0.953 on the
    held-out rows and 0.859 on a news sentence of the benchmark corpus)."""
    held_out = copy.copy(verifier)
    held_out.inputs = validation_inputs()
    held_out.reference = verifier.model.encode(held_out.inputs, batch_size=verifier.batch_size)
    return _sorted_order(held_out)


def _sorted_order(verifier: Any) -> Any:
    """The verifier's length order (``export.build.Verifier.by_length``) for its own rows."""
    lengths = verifier.model.tokenizer(verifier.inputs)["attention_mask"].sum(axis=1)
    verifier.by_length = np.argsort(lengths, kind="stable")
    return verifier


def both_sets(verifier: Any, held_out: Any) -> Any:
    """The verifier over the calibration set and the held-out rows together (what OpenVINO engines are gated on)."""
    both = copy.copy(verifier)
    both.inputs = list(verifier.inputs) + list(held_out.inputs)
    both.reference = np.concatenate([verifier.reference, held_out.reference])
    return _sorted_order(both)


def merged(first: ParityReport, second: ParityReport) -> ParityReport:
    """One report over the rows of two (the calibration set and the held-out rows), under ``first``'s gate."""
    from export.parity import Parity, check_gate

    a, b = first.parity, second.parity
    rows = a.rows + b.rows
    parity = Parity(rows, min(a.min_cos, b.min_cos), (a.mean_cos * a.rows + b.mean_cos * b.rows) / rows,
                    max(a.max_abs, b.max_abs), a.nonfinite_rows + b.nonfinite_rows)
    return ParityReport(parity, first.reference, first.runner, first.batch_size, dict(first.gate),
                        tuple(check_gate(parity, first.gate)))


def ort_backend(path: Path) -> Any:
    """The runtime's own ONNX Runtime backend (its session options) over a file in the work folder."""
    from runtime.backends.onnx import OnnxBackend

    return OnnxBackend(Manifest(engine=path, data={}), "cpu")


def ov_backend(path: Path, inference_precision: str) -> Any:
    from runtime.backends.openvino import OpenVinoBackend, OpenVinoOptions

    return OpenVinoBackend(path, OpenVinoOptions(inference_precision))


class AutoBuilder:
    """Builds the candidates into ``workdir``: ``entries`` is the manifest's list, ``files`` what to move next to
    the engine, ``backends`` the kept engines for the race."""

    def __init__(self, model: Any, base: Path, workdir: Path, out: Path, opts: Any, verifier: Any) -> None:
        self.model, self.base, self.workdir, self.out, self.opts = model, base, workdir, out, opts
        self.calibration = verifier  # the calibration set: what static int8 ranges and ORT's int8 search see
        with opts.progress.step("auto: PyTorch fp32 reference on the held-out rows"):
            self.held_out = held_out_verifier(verifier)
        self.gate_set = both_sets(verifier, self.held_out)  # what every engine is gated on
        self.progress = opts.progress
        self.entries: list[dict[str, Any]] = []
        self.files: list[tuple[Path, Path]] = []  # (in workdir, final path)
        self.backends: dict[str, Any] = {}
        self.main: tuple[Path, ParityReport, dict[str, Any]] | None = None
        wanted = getattr(opts, "engines", None)
        self.wanted = tuple(wanted) if wanted else ENGINES

    def gated(self, precision: str, verifier: Any) -> Any:
        out = copy.copy(verifier)
        out.gate = dict(GATES[precision])
        return out

    def skip(self, name: str, reason: str, extra: dict[str, Any] | None = None) -> None:
        self.progress.note(f"auto: {name} not kept ({reason})")
        self.entries.append({"name": name, "backend": name.split("-")[0], "precision": PRECISION[name], "passed": False,
                             "reason": reason, **(extra or {})})

    def check(self, name: str, backend: Any, runner_name: str) -> ParityReport:
        with self.progress.step(f"auto {name}: parity vs PyTorch ({len(self.gate_set.inputs)} rows, held-out ones included)"):
            return self.gated(PRECISION[name], self.gate_set).check(backend.run, runner_name)

    def check_held_out(self, name: str, backend: Any, runner_name: str) -> ParityReport:
        """An ONNX Runtime engine, already gated on the calibration set by ``export.build``: the held-out rows."""
        with self.progress.step(f"auto {name}: parity vs PyTorch on {len(self.held_out.inputs)} held-out rows"):
            return self.gated(PRECISION[name], self.held_out).check(backend.run, runner_name)

    def consider(self, name: str, path: Path, final: str, backend: Any, runner_name: str,
                 report: ParityReport | None = None, **extra: Any) -> bool:
        """Gate one built engine (unless ``report`` has it); keep it (manifest entry, files, race) if it passes,
        else say why not."""
        report = report or self.check(name, backend, runner_name)
        if not report.passed:
            self.skip(name, f"parity gate: {'; '.join(report.failures)}", {"parity": report.as_dict(), **extra})
            return False
        self.progress.note(f"auto: {name} kept (min cos {report.min_cos:.6f}, max abs {report.parity.max_abs:.2e})")
        self.entries.append({"name": name, "backend": name.split("-")[0], "precision": PRECISION[name], "file": final,
                             "sha256": sha256_file(path), "gate": dict(report.gate), "parity": report.as_dict(),
                             "passed": True, **extra})
        if final != self.out.name and not any(dst.name == final for _, dst in self.files):
            self.files.append((path, self.out.parent / final))
        self.backends[name] = backend
        if name == "onnxruntime-fp32":
            self.main = (path, report, {})
        return True

    # -- ONNX Runtime ---------------------------------------------------------------------------------------------

    def onnxruntime(self) -> None:
        from export.build import _fp32_onnx, _int8_onnx

        path, report, extra = _fp32_onnx(self.model, self.base, self.workdir, self.opts, self.gated("fp32", self.calibration))
        main = self.workdir / "main.onnx"
        shutil.copyfile(path, main)  # the fp32 search may hand back the plain graph, which OpenVINO's fallback reads
        runner = "onnxruntime CPUExecutionProvider"
        backend = ort_backend(main)
        report = merged(report, self.check_held_out("onnxruntime-fp32", backend, runner))
        if not self.consider("onnxruntime-fp32", main, self.out.name, backend, runner, report, graph=_summary(extra.get("graph"))):
            raise GateError(f"{self.out}: parity gate failed for the fp32 engine: {self.entries[-1]['reason']} (no engine written)")
        self.main = (main, self.main[1], extra)  # type: ignore[index]
        if "onnxruntime-int8" not in self.wanted:
            return
        path, report, extra = _int8_onnx(self.model, self.base, self.workdir, self.opts, self.gated("int8", self.calibration))
        if not report.passed:
            self.skip("onnxruntime-int8", f"no int8 recipe passes its gate on the calibration set: {'; '.join(report.failures)}",
                      {"graph": _summary(extra.get("graph"))})
            return
        from export.manifest import onnx_record

        onnx_record(path, self.model, "int8")
        backend = ort_backend(path)
        report = merged(report, self.check_held_out("onnxruntime-int8", backend, runner))
        self.consider("onnxruntime-int8", path, file_name(self.out, "int8.onnx"), backend, runner, report,
                      graph=_summary(extra.get("graph")))

    # -- OpenVINO -------------------------------------------------------------------------------------------------

    def openvino(self) -> None:
        wanted = [n for n in ("openvino-f32", "openvino-bf16", "openvino-int8") if n in self.wanted]
        if not wanted:
            return
        if not cpu_engines.openvino_installed():
            from runtime.deps import install_hint

            for name in wanted:
                self.skip(name, f"openvino is not installed where the bundle was exported ({install_hint('openvino-export')})")
            return
        from export import openvino as eov

        xml = self.workdir / file_name(self.out, "openvino.xml")
        try:
            with self.progress.step("auto: OpenVINO IR of the model (openvino.convert_model from PyTorch)"):
                info = eov.to_ir(self.model, xml)
        except Exception as exc:  # a model the PyTorch frontend cannot convert: OpenVINO reads the ONNX graph instead
            print(f"export: OpenVINO conversion from PyTorch not used ({exc}); falling back to the ONNX graph", file=sys.stderr)
            with self.progress.step("auto: OpenVINO IR of the plain ONNX graph"):
                info = {**eov.to_ir_from_onnx(self.base, xml), "rejected": f"PyTorch conversion failed: {exc}"}
        weights = {"file": file_name(self.out, "openvino.bin"), "sha256": sha256_file(xml.with_suffix(".bin"))}
        bf16 = cpu_engines.native_bf16()
        for name, inference in (("openvino-f32", "f32"), ("openvino-bf16", "bf16")):
            if name not in wanted:
                continue
            if inference == "bf16" and not bf16:
                self.skip(name, "this CPU has no native bf16 (AVX512-BF16 or AMX)")
                continue
            if self.consider(name, xml, xml.name, ov_backend(xml, inference), f"openvino CPU {inference}",
                             inference_precision=inference, weights=weights, graph=info):
                if not any(dst.name == weights["file"] for _, dst in self.files):
                    self.files.append((xml.with_suffix(".bin"), self.out.parent / weights["file"]))
        if "openvino-int8" in wanted:
            try:
                import nncf  # noqa: F401
            except ImportError:
                from runtime.deps import install_hint

                self.skip("openvino-int8", f"nncf is not installed where the bundle was exported ({install_hint('openvino-export')})")
                return
            self.openvino_int8(xml, "bf16" if bf16 else "f32")

    def openvino_int8(self, xml: Path, around: str) -> None:
        from export import openvino as eov
        from export.onnx_graph import ff_width
        from export.quantize import single_rows

        roles = eov.matmul_roles(xml, ff_width(self.model.auto_model.config))
        tried = []
        for i, rung in enumerate(eov.INT8_LADDER):
            label = rung.label
            dst = self.workdir / f"ov-int8.{i}.xml"
            names = rung.float_matmuls(roles)
            with self.progress.step(f"auto openvino-int8 ({label}): NNCF calibration + quantize"):
                qinfo = eov.quantize_int8(xml, dst, single_rows(self.calibration.feeds()), names,
                                          smooth_quant=rung.smooth_quant)
            backend = ov_backend(dst, around)
            report = self.check("openvino-int8", backend, f"openvino CPU int8 + {around}")
            tried.append({"recipe": label, "float_matmuls": len(names), "min_cosine": report.min_cos,
                          "passed": report.passed, "failures": list(report.failures)})
            self.progress.note(f"auto openvino-int8 ({label}): min cos {report.min_cos:.5f} ({'passes' if report.passed else 'fails'} the gate)")
            if report.passed:
                bin_final = file_name(self.out, "openvino-int8.bin")
                self.files.append((dst.with_suffix(".bin"), self.out.parent / bin_final))
                self.consider("openvino-int8", dst, file_name(self.out, "openvino-int8.xml"), backend,
                              f"openvino CPU int8 + {around}", report, inference_precision=around,
                              weights={"file": bin_final, "sha256": sha256_file(dst.with_suffix(".bin"))},
                              graph={**qinfo, "ladder": tried})
                return
        best = max(tried, key=lambda t: t["min_cosine"])
        self.skip("openvino-int8", f"no NNCF int8 recipe passes the int8 gate: best ({best['recipe']}) "
                  f"{'; '.join(best['failures'])}", {"graph": {"ladder": tried}})

    # -- the race -------------------------------------------------------------------------------------------------

    def race(self) -> dict[str, Any]:
        threads = cpu_engines.effective_threads(0)
        with self.progress.step(f"auto: speed race of {len(self.backends)} engines on the calibration set, "
                                f"{cpu_engines.RACE_ROUNDS} rounds ({threads} threads)"):
            timed = cpu_engines.race(self.backends, self.calibration.feeds(by_length=True),  # as the runtime batches
                                     self.model.tokenizer.pad_token_id, self.model.max_seq_length)
        seconds, multiples = cpu_engines.fastest_rules(timed)
        picked = min(seconds, key=seconds.get)
        shown = ", ".join(f"{k} {v:.3f} s" + (f" (widths in multiples of {multiples[k]})" if multiples[k] > 1 else "")
                          for k, v in sorted(seconds.items(), key=lambda kv: kv[1]))
        self.progress.note(f"auto: picked {picked} on this CPU ({shown})")
        return {"cpu": cpu_engines.cpu_signature(), "threads": threads, "seconds": seconds, "length_multiple": multiples,
                "seconds_by_multiple": timed, "picked": picked}


def _summary(graph: Any) -> dict[str, Any]:
    """The parts of an ONNX graph description worth keeping per candidate (the int8 search's record is long)."""
    if not isinstance(graph, dict):
        return {}
    return {k: v for k, v in graph.items() if k not in ("sensitivity",)}


def write_reference(path: Path, inputs: list[Any], vectors: np.ndarray) -> None:
    """The calibration inputs (JSON text per row) and their fp32 PyTorch vectors, in a pickle-free ``.npz``."""
    with open(path, "wb") as fh:
        np.savez(fh, inputs=np.array([json.dumps(x) for x in inputs]), vectors=np.asarray(vectors, dtype=np.float32))


def make_auto_engine(model: Any, base: Path, workdir: Path, out: Path, opts: Any, verifier: Any) -> tuple[Path, ParityReport, dict[str, Any], list[tuple[Path, Path]]]:
    """Build every candidate, race the kept ones; (main engine, its parity, extra manifest fields, files to move)."""
    builder = AutoBuilder(model, base, workdir, out, opts, verifier)
    builder.onnxruntime()
    builder.openvino()
    measured = builder.race()
    ref = workdir / file_name(out, "reference.npz")
    write_reference(ref, builder.gate_set.inputs, builder.gate_set.reference)
    builder.files.append((ref, out.parent / ref.name))
    for entry in builder.entries:
        if not entry["passed"]:
            print(f"export: {entry['name']} not used: {entry['reason']}", file=sys.stderr)
    main, report, extra = builder.main  # type: ignore[misc]
    field = {
        "candidates": builder.entries,
        "reference": {"file": ref.name, "sha256": sha256_file(ref), "rows": int(len(builder.gate_set.inputs))},
        "measured": [measured],
    }
    return main, report, {"graph": extra.get("graph", {}), cpu_engines.FIELD: field}, builder.files


def export_auto_bundle(checkpoint: str | Path, out: str | Path, opts: Any) -> dict[str, Any]:
    """``export.build.export_bundle`` for ``precision="auto"``: the same checks, lock, temp folder and order of
    moves (engine files first, the manifest last), with the candidate files and ``cpu_engines`` added."""
    from export.build import ExportError, Verifier, check_output, lock_path
    from export.manifest import build_manifest, onnx_record
    from export.onnx_graph import export_onnx
    from runtime.bundle import engine_kind, manifest_path, tokenizer_path
    from runtime.files.atomic import atomic_write_text
    from runtime.files.locks import ExclusiveLock, owned_temp_dir
    from trainer.model import InstructorModel

    out = Path(out)
    if engine_kind(out) != "onnx":
        raise ExportError(f"{out}: --precision auto builds CPU engines beside an ONNX one: use --out NAME.onnx")
    unknown = [e for e in (getattr(opts, "engines", None) or ()) if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown CPU engine {unknown[0]!r} (choose from {', '.join(ENGINES)})")
    progress = opts.progress
    check_output(out, opts.overwrite)
    with ExclusiveLock(lock_path(out), str(out)):
        check_output(out, opts.overwrite)
        with progress.step(f"load checkpoint {checkpoint}"):
            model = InstructorModel.from_pretrained(checkpoint)
        with progress.step(f"PyTorch fp32 reference on the calibration set ({opts.reference_device})"):
            verifier = Verifier(model, "fp32", {}, opts.calib_max_batch or 4, opts.calib_batch_size, opts.reference_device)
        with owned_temp_dir(out.parent, f".{out.name}.tmp-") as workdir:
            with progress.step("ONNX export (torch.onnx)"):
                base = export_onnx(model, workdir / "fp32.onnx", opts.opset)
            main, report, extra, files = make_auto_engine(model, base, workdir, out, opts, verifier)
            engine = main.rename(workdir / out.name)
            onnx_record(engine, model, "fp32")
            extra[cpu_engines.FIELD]["candidates"][0]["sha256"] = sha256_file(engine)  # the record changed its bytes
            manifest = build_manifest(model, checkpoint, engine, "fp32", "onnx", report.as_dict(), extra)
            shutil.copyfile(model.tokenizer.path, workdir / tokenizer_path(out).name)
            moves = [*files, (engine, out), (workdir / tokenizer_path(out).name, tokenizer_path(out))]
            manifest_path(out).unlink(missing_ok=True)  # an old manifest must never describe new engines
            for src, dst in moves:
                src.replace(dst)
            atomic_write_text(manifest_path(out), json.dumps(manifest, indent=2) + "\n")
    progress.note(f"wrote {out}")
    return manifest


def summary_line(manifest: dict[str, Any]) -> str:
    """One line for the export's output: what was kept, what was not and why, and what this CPU picked."""
    field = manifest[cpu_engines.FIELD]
    kept = [c["name"] for c in field["candidates"] if c.get("passed")]
    dropped = [f"{c['name']} ({c.get('reason', '')})" for c in field["candidates"] if not c.get("passed")]
    race = field["measured"][-1]
    line = f"auto: {len(kept)} CPU engines kept ({', '.join(kept)}); on this CPU the fastest is {race['picked']}"
    return line + (f"; not kept: {'; '.join(dropped)}" if dropped else "")
