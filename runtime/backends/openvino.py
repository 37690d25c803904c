"""OpenVINO backend: an engine of an ``auto`` bundle run by OpenVINO's CPU plugin (optional extra ``[openvino]``).

OpenVINO is imported here only, when such an engine is opened, so the light install never needs it. The engine is
an OpenVINO IR (``.xml`` + ``.bin``) the exporter wrote beside the ONNX engine: the plain fp32 graph (run in f32,
or in bf16 where the CPU computes bf16 natively) or its NNCF int8 version (int8 where quantized, bf16/f32 around).

Compile settings, as OpenVINO's CPU plugin documents them and optimum-intel sets them:

- ``INFERENCE_PRECISION_HINT``: ``bf16`` or ``f32``, set explicitly. The plugin's own default is bf16 on a CPU
  with AMX or AVX512-BF16 and f32 elsewhere; the backend never relies on that default (an f32 engine must stay
  f32, and its parity gate is the fp32 one), and it reads back what was compiled: a bf16 request that compiles to
  f32 (no native bf16) is refused rather than reported as bf16.
- ``PERFORMANCE_HINT=LATENCY`` (``streams=1``, the default): one stream of every thread on each batch, the way
  optimum-intel compiles by default. On an idle 2-core Xeon with AMX (MiniLM bf16, the benchmark corpus, batch 32)
  it ran 441-520 docs/s where 2 streams of 1 thread ran 332-362, in alternating runs. Under load from other
  processes it was the other way round (2 streams 1.4-1.6x one, load average 10-17): streams do not wait for each
  other at the barriers of small ops when a core is taken away. ``streams=0``: ``THROUGHPUT``, the plugin's choice
  of streams; ``N``: N streams; with more than one, ``run_many`` keeps one batch in flight per stream.
  ``INFERENCE_NUM_THREADS`` from ``threads``.
- Dynamic batch and sequence: each new shape is planned once and kept in the plugin's runtime cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from runtime.bundle import INPUT_NAMES, OUTPUT_NAME, EngineError
from runtime.deps import require

INFERENCE_PRECISIONS = ("f32", "bf16")


@dataclass
class OpenVinoOptions:
    """What the backend compiles the engine with (see the module doc)."""

    inference_precision: str = "f32"  # "f32" or "bf16"
    threads: int = 0  # 0: OpenVINO's default (every core)
    streams: int = 1  # 1: LATENCY (one stream of every thread); 0: the plugin's THROUGHPUT choice; N: N streams


def openvino_module() -> Any:
    """``openvino``, or ``MissingDependency`` naming the extra that installs it."""
    return require("openvino", "openvino", "an OpenVINO engine")


def native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 natively here (AVX512-BF16 or AMX: capability ``BF16``)."""
    ov = openvino_module()
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_config(options: OpenVinoOptions) -> dict[str, str]:
    """The CPU plugin properties for ``options``."""
    if options.inference_precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"inference_precision must be one of {INFERENCE_PRECISIONS}, got {options.inference_precision!r}")
    config = {"INFERENCE_PRECISION_HINT": options.inference_precision,
              "PERFORMANCE_HINT": "LATENCY" if options.streams == 1 else "THROUGHPUT"}
    if options.streams > 1:
        config["NUM_STREAMS"] = str(int(options.streams))
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = str(int(options.threads))
    return config


def _type_name(value: Any) -> str:
    """OpenVINO's element type as the hint spells it (``bf16``, ``f32``)."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


class OpenVinoBackend:
    """One compiled model and one infer request over an IR (or ONNX) file, on the CPU."""

    def __init__(self, model_file: str | Path, options: OpenVinoOptions | None = None) -> None:
        ov = openvino_module()
        self.options = options or OpenVinoOptions()
        model_file = Path(model_file)
        try:
            self.compiled = ov.Core().compile_model(str(model_file), "CPU", compile_config(self.options))
        except RuntimeError as exc:  # OpenVINO raises RuntimeError for unreadable or invalid models
            raise EngineError(f"{model_file}: OpenVINO cannot load the engine ({str(exc).strip().splitlines()[0]})") from exc
        names = sorted(name for port in self.compiled.inputs for name in port.get_names() if name in INPUT_NAMES)
        outputs = [name for port in self.compiled.outputs for name in port.get_names()]
        if names != sorted(INPUT_NAMES) or OUTPUT_NAME not in outputs:
            raise EngineError(f"{model_file}: engine inputs {names} / outputs {outputs}, expected {list(INPUT_NAMES)} / {OUTPUT_NAME!r}")
        self.inference_precision = _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        if self.inference_precision != self.options.inference_precision:
            raise EngineError(
                f"{model_file}: asked OpenVINO for {self.options.inference_precision} inference, it compiled "
                f"{self.inference_precision} (this CPU has no native bf16: AVX512-BF16 or AMX)"
            )
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self.requests = [self.compiled.create_infer_request() for _ in range(max(1, self.streams))]
        self.name = f"openvino:CPU:{self.inference_precision}"
        self.device = "cpu"
        self.max_rows = None
        self.default_max_tokens = None

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        request = self.requests[0]
        request.infer({name: feeds[name] for name in INPUT_NAMES}, share_inputs=True)
        return _output(request)

    def run_many(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[np.ndarray]:
        """The vectors of each batch, in order, with one batch in flight per stream (the caller's thread only
        waits; nothing runs in a callback)."""
        source = iter(batches)
        pending: deque = deque()

        def submit(request: Any) -> None:
            feeds = next(source, None)
            if feeds is not None:
                request.start_async({name: feeds[name] for name in INPUT_NAMES}, share_inputs=True)
                pending.append(request)

        for request in self.requests:
            submit(request)
        while pending:
            request = pending.popleft()
            request.wait()
            out = _output(request)
            submit(request)
            yield out

    def close(self) -> None:
        self.requests = []
        self.compiled = None


def _output(request: Any) -> np.ndarray:
    return np.array(request.get_tensor(OUTPUT_NAME).data, dtype=np.float32, copy=True)
