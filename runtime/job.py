"""What an encoding run is asked to do (``EncodeJob``) and what it reports (``RunSummary``).

One frozen object serves the command line (``python -m runtime.encode`` parses its flags into it), Python callers
and the Ray path; every default is written here once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.files.atomic import atomic_write_text
from runtime.chunking import DEFAULT_OVERLAP, LONG_TEXT, POOLING
from runtime.encoder import DEFAULT_MAX_PADDING, DEFAULT_WINDOW
from runtime.output_dtype import NEEDS_RANGES, OUTPUT_DTYPES
from runtime.files.readers import MAX_ERRORS, MAX_LISTED, ReaderOptions, Skipped
from runtime.tokenization import has_lone_surrogate

DEVICES = ("auto", "cpu", "cuda")
ON_ERROR = ("raise", "skip")
CHUNK_OUTPUT = ("row", "all")


@dataclass(frozen=True)
class RayOptions:
    """Ray Data settings (``--ray``): see ``runtime.ray_encode``."""

    address: str | None = None  # an existing cluster; None starts one on this machine
    num_workers: int = 1  # engine actors, one engine each
    gpus_per_worker: float | None = None  # None: 1 for .plan and a CUDA .pt2, 0 otherwise
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
    output_dtype: str = "float32"  # see runtime.output_dtype
    int8_ranges: Path | None = None  # [2, dim] ranges for int8/uint8; None: from the first window
    long_text: str = "truncate"  # or "chunk": see runtime.chunking
    chunk_overlap: int = DEFAULT_OVERLAP
    chunk_pooling: str = "mean"
    chunk_output: str = "row"  # or "all": one output row per chunk, with its number and token span
    on_error: str = "raise"
    batch_size: int = 64
    max_tokens: int | None = None  # None: the backend's default (GPU-sized on CUDA, else DEFAULT_MAX_TOKENS)
    max_padding: float = DEFAULT_MAX_PADDING
    shard_rows: int = DEFAULT_WINDOW
    device: str = "auto"
    threads: int = 0  # ONNX Runtime intra-op threads; 0: one per core
    precision: str = "auto"  # which engine of a --precision auto bundle (runtime.cpu_engines); a one-engine bundle: it
    verify_engine: bool = True
    overwrite: bool = False
    quiet: bool = False
    ray: RayOptions | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", Path(self.input))
        object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "engine", str(self.engine))
        if self.int8_ranges is not None:
            object.__setattr__(self, "int8_ranges", Path(self.int8_ranges))

    def problems(self) -> list[str]:
        """What is wrong with the options themselves (before any file is touched)."""
        out = []
        for name in ("batch_size", "max_tokens", "shard_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
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
        if self.output_dtype not in OUTPUT_DTYPES:
            out.append(f"--output-dtype must be one of {', '.join(OUTPUT_DTYPES)}")
        if self.int8_ranges is not None and self.output_dtype not in NEEDS_RANGES:
            out.append("--int8-ranges goes with --output-dtype int8 or uint8")
        if self.ray is not None and self.output_dtype in NEEDS_RANGES and self.int8_ranges is None:
            out.append("--ray with --output-dtype int8/uint8 needs --int8-ranges (its workers have no common first window)")
        if self.long_text not in LONG_TEXT:
            out.append(f"--long-text must be one of {', '.join(LONG_TEXT)}")
        if self.chunk_pooling not in POOLING:
            out.append(f"--chunk-pooling must be one of {', '.join(POOLING)}")
        if self.chunk_overlap < 0:
            out.append("--chunk-overlap must be >= 0")
        if self.chunk_output not in CHUNK_OUTPUT:
            out.append(f"--chunk-output must be one of {', '.join(CHUNK_OUTPUT)}")
        if self.chunk_output == "all" and self.long_text != "chunk":
            out.append("--chunk-output all goes with --long-text chunk")
        return out

    @property
    def keep_chunks(self) -> bool:
        return self.chunk_output == "all"

    def encoder_options(self) -> dict[str, Any]:
        """``runtime.Encoder`` keyword arguments of this job (device aside)."""
        return {"max_tokens": self.max_tokens, "max_padding": self.max_padding, "verify_engine": self.verify_engine,
                "long_text": self.long_text, "chunk_overlap": self.chunk_overlap, "chunk_pooling": self.chunk_pooling,
                "precision": self.precision, **self.onnx_options}

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
    output_dtype: str
    engine: str
    engine_manifest_sha256: str
    precision: str
    backend: str | None = None
    engine_choice: dict[str, Any] | None = None  # the engine of the bundle that ran, and how it was picked
    padded_tokens: int | None = None
    padding_waste: float | None = None
    resumed_rows: int | None = None
    encode_s: float | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    long_text: str | None = None  # with --long-text chunk:
    chunks: int | None = None  # engine inputs (rows, or their chunks)
    split_rows: int | None = None  # rows cut into several chunks
    output_vectors: int | None = None  # vectors in the output (one per chunk with --chunk-output all)
    ranges: str | None = None  # int8/uint8: the file of the ranges used (OUTPUT.ranges.npy)
    warnings: list[str] | None = None  # what the run did that may not be what was meant (an unused instruction field)

    @classmethod
    def of(cls, job: EncodeJob, manifest: Any, skipped: Skipped, rows: int, tokens: int, truncated: int,
           elapsed: float, rate: tuple[int, int, float], **extra: Any) -> "RunSummary":
        """The fields every run reports; ``rate``: (rows, tokens, seconds) that docs/s and tokens/s are taken over."""
        rate_rows, rate_tokens, seconds = rate
        return cls(
            output=str(job.output), input=str(job.input), rows=rows, tokens=tokens, truncated_rows=truncated,
            skipped_rows=skipped.count, skipped_lines=skipped.lines[:MAX_LISTED], skipped_errors=skipped.first_errors[:MAX_ERRORS],
            blank_lines=skipped.blank_lines, elapsed_s=round(elapsed, 3),
            docs_per_s=round(rate_rows / max(seconds, 1e-9), 2), tokens_per_s=round(rate_tokens / max(seconds, 1e-9), 1),
            embedding_dim=manifest.embedding_dim, output_dtype=job.output_dtype, engine=job.engine,
            engine_manifest_sha256=manifest.sha256, precision=extra.pop("precision", manifest.precision),
            warnings=[skipped.unused_instruction.warning(job.input)] if skipped.unused_instruction else None, **extra,
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def write(self) -> Path:
        path = summary_path(Path(self.output))
        atomic_write_text(path, json.dumps(self.as_dict(), indent=2) + "\n")
        return path
