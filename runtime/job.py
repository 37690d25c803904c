"""What an encoding run is asked to do (``EncodeJob``) and what it reports (``RunSummary``).

One frozen object serves the command line (``python -m runtime.encode`` parses its flags into it), Python callers
and the Ray path; every default is written here once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.atomic import atomic_write_text
from runtime.encoder import DEFAULT_MAX_PADDING, DEFAULT_MAX_TOKENS, DEFAULT_WINDOW
from runtime.readers import ReaderOptions
from runtime.tokenization import has_lone_surrogate

DEVICES = ("auto", "cpu", "cuda")
ON_ERROR = ("raise", "skip")


@dataclass(frozen=True)
class RayOptions:
    """Ray Data settings (``--ray``): see ``runtime.ray_encode``."""

    address: str | None = None  # an existing cluster; None starts one on this machine
    num_workers: int = 1  # engine actors, one engine each
    gpus_per_worker: float | None = None  # None: 1 for .plan, 0 otherwise
    build_on_worker: bool = False  # rebuild a .plan made for another GPU/TensorRT instead of refusing it
    span_bytes: int = 64 << 20  # input bytes per read task
    rows_per_call: int = 1024  # rows an actor encodes per call


@dataclass(frozen=True)
class EncodeJob:
    """One run of ``python -m runtime.encode``: an input file embedded into an output file with an engine."""

    engine: str
    input: Path
    output: Path
    text_field: str = "text"
    instruction: str | None = None  # one instruction for every row
    instruction_field: str | None = None  # or one per row
    id_field: str | None = None
    dtype: str = "float32"
    on_error: str = "raise"
    batch_size: int = 64
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_padding: float = DEFAULT_MAX_PADDING
    shard_rows: int = DEFAULT_WINDOW
    device: str = "auto"
    threads: int = 0  # ONNX Runtime intra-op threads; 0: one per core
    verify_engine: bool = True
    overwrite: bool = False
    quiet: bool = False
    ray: RayOptions | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", Path(self.input))
        object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "engine", str(self.engine))

    def problems(self) -> list[str]:
        """What is wrong with the options themselves (before any file is touched)."""
        out = []
        for name in ("batch_size", "max_tokens", "shard_rows"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1")
        if not 0.0 <= self.max_padding < 1.0:
            out.append("--max-padding must be in [0, 1)")
        if self.threads < 0:
            out.append("--threads must be >= 0")
        if self.device not in DEVICES:
            out.append(f"--device must be one of {', '.join(DEVICES)}")
        if self.on_error not in ON_ERROR:
            out.append(f"--on-error must be one of {', '.join(ON_ERROR)}")
        if self.instruction is not None and self.instruction_field is not None:
            out.append("give --instruction or --instruction-field, not both")
        if self.instruction is not None and has_lone_surrogate(self.instruction):
            out.append("--instruction is not valid Unicode text")
        if self.ray is not None and self.ray.num_workers < 1:
            out.append("--num-workers must be >= 1")
        return out

    def reader_options(self) -> ReaderOptions:
        return ReaderOptions(self.text_field, self.instruction, self.instruction_field, self.id_field, self.on_error)

    @property
    def engine_device(self) -> str | None:
        return None if self.device == "auto" else self.device

    @property
    def onnx_options(self) -> dict[str, Any]:
        return {"intra_op_threads": self.threads} if self.engine.lower().endswith(".onnx") else {}


def summary_path(output: Path) -> Path:
    return Path(f"{output}.summary.json")


@dataclass
class RunSummary:
    """What a run did, written to ``OUTPUT.summary.json`` and printed; fields that do not apply are left out."""

    output: str
    input: str
    rows: int
    tokens: int
    truncated_rows: int
    skipped_rows: int
    skipped_lines: list[int]
    skipped_errors: list[str]
    blank_lines: int
    elapsed_s: float
    docs_per_s: float
    tokens_per_s: float
    embedding_dim: int
    dtype: str
    engine: str
    engine_manifest_sha256: str
    precision: str
    backend: str | None = None
    padded_tokens: int | None = None
    padding_waste: float | None = None
    resumed_rows: int | None = None
    encode_s: float | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def write(self) -> Path:
        path = summary_path(Path(self.output))
        atomic_write_text(path, json.dumps(self.as_dict(), indent=2) + "\n")
        return path
