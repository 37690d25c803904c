"""The CPU engines of an ``auto`` bundle, and which one runs here (``Encoder(path, precision="auto")``).

``python -m export CKPT --out NAME.onnx --precision auto`` writes, beside the ONNX Runtime fp32 engine ``NAME.onnx``,
every other CPU engine that passed its parity gate (files ``NAME.onnx.cpu.*``): ONNX Runtime int8, the OpenVINO IR
run in f32 or bf16, its NNCF int8 version. The manifest field ``cpu_engines`` lists them (``candidates``: file,
sha256, gate and parity, or why one was not kept), holds the fp32 PyTorch reference vectors of the calibration set
(``reference``: a ``.npz`` file) and the race the exporter ran on its own CPU (``measured``: seconds per engine,
the CPU's model name and vector flags, the thread count).

``choose`` picks the engine for this process:

1. only the engines that can run here: their library installed (``openvino``), bf16 only where the CPU computes
   bf16 natively (OpenVINO's ``BF16`` capability: AVX512-BF16 or AMX), and of the asked precision (``auto``: any);
2. on the CPU (model name, vector flags) and thread count the exporter measured: the fastest of its race;
3. on any other CPU or thread count: measured here, once. Each engine runs the calibration set and is compared
   with the reference vectors under its own gate (a CPU with other kernels gives other rounding), those that pass
   race in turns (median of ``RACE_ROUNDS``), and the result is cached (``cache_dir()/cpu-engine-picks.json``,
   keyed by the manifest's sha256, the CPU and the threads), so only the first load on a machine pays for it.

Each engine races twice, at the batch's own width and at widths rounded up to ``LENGTH_MULTIPLES`` (see
``runtime.batching.aligned``); the faster rule is the engine's time, and the encoder pads that engine's batches by
it (``Choice.length_multiple``). On an AMX Xeon, OpenVINO's bf16 and int8 kernels run a width of a multiple of 16
faster than the widths just below it; whether that pays for the padding on real batches is what the race measures.

An engine passed over is named with the reason (``Choice.skipped``); the CLI summary, the server's ``/info`` and
``Encoder.engine_choice`` say which one was picked and how. A bundle without ``cpu_engines`` holds one engine,
which is the choice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from runtime.batching import widen
from runtime.files.atomic import atomic_write_text
from runtime.bundle import EngineError, Manifest, cache_dir, verify_engine_file
from runtime import parity
from runtime.deps import MissingDependency, install_hint

FIELD = "cpu_engines"
FILE_INFIX = ".cpu."  # candidate files of the bundle at PATH: PATH.cpu.NAME...
CHOICES = ("auto", "fp32", "bf16", "int8")
RACE_ROUNDS = 3
LENGTH_MULTIPLES = (1, 16)  # the width rules each engine races with: the longest row's length; rounded up to 16
PICKS_CACHE_FILE = "cpu-engine-picks.json"
PICKS_CACHE_ENTRIES = 64
# the vector extensions that decide which kernels run (VNNI: int8 dot products; AVX512-BF16 / AMX: bf16, int8 tiles)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
             "amx_int8", "amx_tile")


@dataclass(frozen=True)
class Candidate:
    """One engine of the bundle as the manifest lists it."""

    name: str  # e.g. "openvino-bf16"
    backend: str  # "onnxruntime" or "openvino"
    precision: str  # fp32, bf16 or int8: the gate it passed
    file: str | None = None  # in the bundle's folder; None when it was not kept
    sha256: str | None = None
    weights: dict[str, str] | None = None  # OpenVINO: the IR's .bin {"file", "sha256"}
    inference_precision: str | None = None  # OpenVINO: what it was gated with (f32, bf16)
    gate: dict[str, float] = field(default_factory=dict)  # the export's gate: min_cos and/or max_abs
    passed: bool = True
    reason: str = ""  # why it was not kept

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Candidate":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Choice:
    """The engine this process runs, and how it was chosen."""

    name: str
    backend: str
    precision: str
    how: str  # one sentence: measured at export on this CPU / measured here / the bundle's only engine / ...
    candidate: Candidate | None = None  # None: the bundle's main engine through open_backend
    seconds: dict[str, float] = field(default_factory=dict)  # the race this choice came from
    skipped: dict[str, str] = field(default_factory=dict)  # engine -> why it was not a contender
    inference_precision: str | None = None
    length_multiple: int = 1  # the encoder pads this engine's batches to widths in multiples of this (its race's pick)

    def as_dict(self) -> dict[str, Any]:
        """For the CLI summary and the server's ``/info``."""
        out: dict[str, Any] = {"engine": self.name, "backend": self.backend, "precision": self.precision, "how": self.how}
        if self.inference_precision:
            out["inference_precision"] = self.inference_precision
        if self.length_multiple > 1:
            out["length_multiple"] = self.length_multiple
        if self.seconds:
            out["race_seconds"] = {k: round(v, 4) for k, v in self.seconds.items()}
        if self.skipped:
            out["skipped"] = dict(self.skipped)
        return out


def is_auto_bundle(manifest: Manifest) -> bool:
    return isinstance(manifest.data.get(FIELD), dict)


BACKENDS = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")


def candidates(manifest: Manifest) -> list[Candidate]:
    """The manifest's engines, each checked where the runtime acts on it: names, backend, precision, and files
    that are the bundle's own (``NAME.onnx`` or ``NAME.onnx.cpu.*`` in its folder); ``EngineError`` names the field."""
    from runtime.bundle import manifest_path

    listed = manifest.data.get(FIELD, {}).get("candidates")
    where = manifest_path(manifest.engine)
    if not isinstance(listed, list) or not listed:
        raise EngineError(f"{where}: manifest field '{FIELD}.candidates' must be a non-empty list")
    out = []
    for i, data in enumerate(listed):
        name = f"{FIELD}.candidates[{i}]"
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise EngineError(f"{where}: manifest field '{name}' must be an object with a name")
        for key, allowed in (("backend", BACKENDS), ("precision", PRECISIONS)):
            if data.get(key) not in allowed:
                raise EngineError(f"{where}: manifest field '{name}.{key}' must be one of {', '.join(allowed)}")
        files = [data.get("file")] + ([data["weights"].get("file")] if isinstance(data.get("weights"), dict) else [])
        for f in files:
            own = f == manifest.engine.name or (isinstance(f, str) and f.startswith(manifest.engine.name + FILE_INFIX) and "/" not in f and "\\" not in f)
            if data.get("passed") is not False and not own:
                raise EngineError(f"{where}: manifest field '{name}.file' = {f!r} is not a file of this bundle")
        out.append(Candidate.from_dict(data))
    if not any(c.file == manifest.engine.name for c in out):
        raise EngineError(f"{where}: manifest field '{FIELD}.candidates' does not list the bundle's engine {manifest.engine.name}")
    return out


def cpu_signature() -> dict[str, Any]:
    """This CPU as the picks are keyed: its model name and the vector flags that decide the kernels."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": model, "flags": [f for f in CPU_FLAGS if f in flags]}


def effective_threads(threads: int) -> int:
    return int(threads) or os.cpu_count() or 1


def native_bf16() -> bool:
    from runtime.backends.openvino import native_bf16 as check

    return check()


def openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def runnable(cands: Iterable[Candidate]) -> tuple[list[Candidate], dict[str, str]]:
    """The kept engines that can run in this process, and why each other one cannot."""
    ok: list[Candidate] = []
    skipped: dict[str, str] = {}
    have_ov = None
    for c in cands:
        if not c.passed or c.file is None:
            skipped[c.name] = f"not kept at export: {c.reason or 'failed its gate'}"
            continue
        if c.backend == "openvino":
            have_ov = openvino_installed() if have_ov is None else have_ov
            if not have_ov:
                skipped[c.name] = f"openvino is not installed ({install_hint('openvino')})"
                continue
            if c.precision == "bf16" and not native_bf16():
                skipped[c.name] = "this CPU has no native bf16 (AVX512-BF16 or AMX)"
                continue
        ok.append(c)
    return ok, skipped


Measured = tuple[dict[str, float], dict[str, str], dict[str, int]]  # a race: seconds per engine, failed -> why, length multiple per engine


def _wanted(c: Candidate, precision: str) -> bool:
    return precision == "auto" or c.precision == precision or c.name == precision


def choose(manifest: Manifest, precision: str = "auto", device: str | None = None, threads: int = 0,
           measure: Callable[[list[Candidate]], Measured] | None = None) -> Choice:
    """The engine to run for ``precision`` (``auto``, fp32, bf16, int8 or an engine's name) on this CPU."""
    if not is_auto_bundle(manifest):
        main = Choice(f"{manifest.kind}-{manifest.precision}", _backend_of(manifest), manifest.precision,
                      "the bundle's only engine")
        if precision not in ("auto", manifest.precision, main.name):
            raise EngineError(
                f"{manifest.engine}: precision {precision!r} asked, but this bundle holds one {manifest.precision} engine "
                "(export with --precision auto for a bundle of CPU engines to choose from)"
            )
        return main
    cands = candidates(manifest)
    names = {c.name for c in cands}
    if precision not in CHOICES and precision not in names:
        raise ValueError(f"precision {precision!r}: choose from {', '.join(CHOICES)} or an engine of this bundle ({', '.join(sorted(names))})")
    main = next(c for c in cands if c.file == manifest.engine.name)
    if device is not None and device != "cpu" or (device is None and _onnx_picks_cuda()):
        if precision not in ("auto", main.precision, main.name):
            raise EngineError(f"{manifest.engine}: on a GPU the bundle runs its {main.name} engine, not {precision!r}")
        return Choice(main.name, main.backend, main.precision, "a GPU: the ONNX engine on ONNX Runtime's CUDA EP", main)
    ok, skipped = runnable(c for c in cands if _wanted(c, precision))
    if not ok:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "none of that precision"
        raise EngineError(f"{manifest.engine}: no CPU engine of precision {precision!r} can run here ({why})")
    if len(ok) == 1 and ok[0] is main:  # nothing to race, and the fp32 ONNX engine is the bundle's own
        return _choice(main, "the only engine of that precision that can run here", {}, skipped)
    seconds, failed, multiples, how = _measured(manifest, ok, threads, measure)  # one engine on another CPU is still gated here
    skipped.update(failed)
    timed = {k: v for k, v in seconds.items() if k in {c.name for c in ok} and k not in failed}
    if not timed:
        why = "; ".join(f"{k}: {v}" for k, v in failed.items())
        raise EngineError(f"{manifest.engine}: no CPU engine of precision {precision!r} passed its gate on this CPU ({why})")
    best = min(timed, key=timed.get)
    return _choice(next(c for c in ok if c.name == best), how, timed, skipped, int(multiples.get(best, 1)))


def _choice(c: Candidate, how: str, seconds: dict[str, float], skipped: dict[str, str], length_multiple: int = 1) -> Choice:
    return Choice(c.name, c.backend, c.precision, how, c, seconds, skipped, inference_precision(c), length_multiple)


def _backend_of(manifest: Manifest) -> str:
    return {"onnx": "onnxruntime", "tensorrt": "tensorrt", "pt2": "torch"}.get(manifest.kind, manifest.kind)


def _onnx_picks_cuda() -> bool:
    from runtime.backends.onnx import picks_cuda

    return picks_cuda(None)


def inference_precision(c: Candidate) -> str | None:
    """What an OpenVINO engine is compiled with here: its gated precision, but f32 around int8 ops on a CPU
    without native bf16 (the int8 engine was gated with bf16 around it where the exporter's CPU had bf16)."""
    if c.backend != "openvino":
        return None
    if c.precision == "int8" and c.inference_precision == "bf16" and not native_bf16():
        return "f32"
    return c.inference_precision or "f32"


def _measured(manifest: Manifest, ok: list[Candidate], threads: int, measure: Any) -> tuple[dict[str, float], dict[str, str], dict[str, int], str]:
    """(seconds per engine, engines that failed their gate here, each engine's length multiple, how): the export's
    race if it ran on this CPU with these threads, else a cached race of this machine, else a race run now (and
    cached). A race recorded before length multiples were raced pads to the longest row (multiple 1)."""
    sig, n = cpu_signature(), effective_threads(threads)
    for entry in manifest.data[FIELD].get("measured", []):
        if entry.get("cpu") == sig and entry.get("threads") == n:
            return (dict(entry["seconds"]), {}, dict(entry.get("length_multiple", {})),
                    f"fastest of the export's race on this CPU ({n} threads)")
    key = hashlib.sha256(json.dumps([manifest.sha256, sig, n], sort_keys=True).encode()).hexdigest()
    cache = cache_dir() / PICKS_CACHE_FILE
    entries = _read_cache(cache)
    names = sorted(c.name for c in ok)
    hit = entries.get(key)
    if isinstance(hit, dict) and sorted(hit.get("engines", [])) == names:
        return (dict(hit["seconds"]), dict(hit["failed"]), dict(hit.get("length_multiple", {})),
                f"fastest of a race measured earlier on this CPU ({n} threads; cached)")
    print(f"{manifest.engine}: measuring {len(ok)} CPU engines on this CPU ({n} threads), once: "
          f"the gate on the reference vectors, then a race of {RACE_ROUNDS} rounds", file=sys.stderr)
    seconds, failed, multiples = (measure or (lambda cs: measure_here(manifest, cs, n)))(ok)
    entries.pop(key, None)
    entries[key] = {"engines": names, "seconds": seconds, "failed": failed, "length_multiple": multiples, "cpu": sig, "threads": n}
    try:
        atomic_write_text(cache, json.dumps(dict(list(entries.items())[-PICKS_CACHE_ENTRIES:])))
    except OSError:
        pass
    return seconds, failed, multiples, f"fastest of a race measured here ({n} threads)"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- running and measuring --------------------------------------------------------------------------------------


def candidate_path(manifest: Manifest, c: Candidate) -> Path:
    return manifest.engine.parent / str(c.file)


def open_candidate(manifest: Manifest, c: Candidate, threads: int = 0, verify: bool = True, **onnx_options: Any) -> Any:
    """A backend for one engine of the bundle, its files checked against the manifest's sha256 first."""
    path = candidate_path(manifest, c)
    if verify:
        if not path.is_file():
            raise EngineError(f"{path}: engine file of {c.name} not found (the bundle's files must stay together)")
        verify_engine_file(path, c.sha256)
        if c.weights:
            verify_engine_file(manifest.engine.parent / c.weights["file"], c.weights["sha256"])
    if c.backend == "openvino":
        from runtime.backends.openvino import OpenVinoBackend, OpenVinoOptions

        return OpenVinoBackend(path, OpenVinoOptions(inference_precision(c) or "f32", threads))
    from runtime.backends import open_backend

    view = dataclasses.replace(manifest, engine=path, data={**manifest.data, "precision": c.precision})
    return open_backend(view, "cpu", **onnx_options, **({"intra_op_threads": threads} if threads else {}))


def reference(manifest: Manifest) -> tuple[list[Any], np.ndarray]:
    """The calibration inputs and their fp32 PyTorch vectors, as the exporter stored them."""
    info = manifest.data[FIELD].get("reference")
    if not isinstance(info, dict):
        raise EngineError(f"{manifest.engine}: manifest field 'cpu_engines.reference' is missing (re-export the bundle)")
    path = manifest.engine.parent / info["file"]
    verify_engine_file(path, info.get("sha256"))
    with np.load(path, allow_pickle=False) as data:
        return [json.loads(str(s)) for s in data["inputs"]], np.asarray(data["vectors"], dtype=np.float32)


def gate_failures(reference_vectors: np.ndarray, candidate: np.ndarray, gate: dict[str, float]) -> list[str]:
    """The exporter's gate (``runtime.parity``) on vectors computed here: row-wise min cosine (a NaN/inf row counts
    as -1, rows both zero as 1) and max abs difference; the failures as sentences."""
    return parity.gate_failures(parity.compare(reference_vectors, candidate), gate)


def run_each(backend: Any, batches: list[dict[str, np.ndarray]]) -> Iterator[np.ndarray]:
    """Each batch's vectors in order: through the backend's ``run_many`` where it has one (several batches in
    flight: OpenVINO's streams), else one ``run`` at a time, lazily."""
    run_many = getattr(backend, "run_many", None)
    if run_many is not None and len(batches) > 1:
        return run_many(batches)
    return (backend.run(f) for f in batches)


def race(backends: dict[str, Any], feeds: list[dict[str, np.ndarray]], pad_id: int, max_seq_length: int,
         rounds: int = RACE_ROUNDS) -> dict[str, dict[int, float]]:
    """Median seconds over ``feeds`` per backend and width rule of ``LENGTH_MULTIPLES``. Each (backend, rule) runs
    as the encoder runs a window (``run_each``), all taking turns each round (a load that drifts weighs on all
    alike), each once untimed first."""
    lanes = {(name, m): (backend, [widen(f, m, max_seq_length, pad_id) for f in feeds])
             for name, backend in backends.items() for m in LENGTH_MULTIPLES}
    for backend, lane_feeds in lanes.values():
        for _ in run_each(backend, lane_feeds):
            pass
    times: dict[tuple[str, int], list[float]] = {lane: [] for lane in lanes}
    for r in range(rounds):
        order = list(lanes.items())
        order = order[r % len(order):] + order[: r % len(order)]
        for lane, (backend, lane_feeds) in order:
            t0 = time.perf_counter()
            for _ in run_each(backend, lane_feeds):
                pass
            times[lane].append(time.perf_counter() - t0)
    return {name: {m: float(statistics.median(times[(name, m)])) for m in LENGTH_MULTIPLES} for name in backends}


def fastest_rules(timed: dict[str, dict[int, float]]) -> tuple[dict[str, float], dict[str, int]]:
    """(seconds, length multiple) per engine at its faster width rule of a ``race``; a tie goes to the narrower."""
    multiples = {name: min(by_rule, key=lambda m: (by_rule[m], m)) for name, by_rule in timed.items()}
    return {name: timed[name][m] for name, m in multiples.items()}, multiples


def measure_here(manifest: Manifest, cands: list[Candidate], threads: int, batch_size: int = 16) -> Measured:
    """Gate each engine on the reference vectors on this CPU, race those that pass; (seconds, failed -> why, length
    multiples)."""
    inputs, ref = reference(manifest)
    tok = manifest.tokenizer()
    order = np.argsort(tok.encode(inputs).lengths, kind="stable")  # the race runs length-sorted batches, as the encoder does
    feeds = [tok(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    race_feeds = [tok([inputs[j] for j in order[i : i + batch_size]]) for i in range(0, len(inputs), batch_size)]
    racers: dict[str, Any] = {}
    failed: dict[str, str] = {}
    backends = []
    try:
        for c in cands:
            try:
                backend = open_candidate(manifest, c, threads)
            except (EngineError, MissingDependency) as exc:
                failed[c.name] = f"cannot open it here: {exc}"
                continue
            backends.append(backend)
            vectors = np.concatenate(list(run_each(backend, feeds)))
            failures = gate_failures(ref, vectors, c.gate)
            if failures:
                failed[c.name] = f"failed its gate on this CPU against the reference vectors: {'; '.join(failures)}"
                continue
            racers[c.name] = backend
        seconds, multiples = fastest_rules(race(racers, race_feeds, tok.pad_token_id, manifest.max_seq_length) if racers else {})
        return seconds, failed, multiples
    finally:
        for b in backends:
            b.close()


def open_choice(manifest: Manifest, choice: Choice, device: str | None, threads: int, **onnx_options: Any) -> Any:
    """The backend of ``choice``: the bundle's main engine through ``open_backend``, or one of its CPU engines."""
    from runtime.backends import open_backend

    c = choice.candidate
    if c is None or (c.file == manifest.engine.name and c.backend == "onnxruntime"):
        return open_backend(manifest, device, **onnx_options)
    options = {k: v for k, v in onnx_options.items() if k != "intra_op_threads"}
    return open_candidate(manifest, c, threads, verify=getattr(manifest, "verified", True), **options)
