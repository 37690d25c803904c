"""The manifest an exporter writes beside every engine (format in ``runtime.bundle``)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata as md
from pathlib import Path
from typing import Any

from runtime.bundle import INPUT_NAMES, MANIFEST_FORMAT, OUTPUT_NAME, sha256_file, tokenizer_path
from runtime.tokenization import INSTRUCTION_RULES_VERSION
from trainer.model import InstructorModel


def checkpoint_sha256(folder: str | Path) -> str:
    """One hash over every file of a checkpoint folder (relative path + content hash, sorted)."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def tool_versions(*names: str) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def io_spec(model: InstructorModel) -> dict[str, Any]:
    """The engine's input and output names, dtypes and shapes (the same for every precision)."""
    return {
        "inputs": [
            {"name": INPUT_NAMES[0], "dtype": "int64", "shape": ["batch", "sequence"]},
            {"name": INPUT_NAMES[1], "dtype": "int64", "shape": ["batch", "sequence"]},
            {"name": INPUT_NAMES[2], "dtype": "int64", "shape": ["batch"]},
        ],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", model.embedding_dim]}],
    }


def build_manifest(
    model: InstructorModel,
    checkpoint: str | Path,
    engine: Path,
    precision: str,
    kind: str,
    parity: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a runtime (or a person) needs to know about an engine, parity figures included."""
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "engine": {"kind": kind, "file": engine.name, "bytes": engine.stat().st_size, "sha256": sha256_file(engine)},
        "precision": precision,
        "source": {"checkpoint": str(Path(checkpoint).resolve()), "sha256": checkpoint_sha256(checkpoint)},
        "architecture": model.architecture,
        "hidden_size": model.hidden_size,
        "embedding_dim": model.embedding_dim,
        "max_seq_length": model.max_seq_length,
        # the engine's table sizes, so that a runtime refuses a tokenizer or length they cannot hold (None: relative positions)
        "vocab_size": int(model.auto_model.config.vocab_size),
        "max_position_embeddings": getattr(model.auto_model.config, "max_position_embeddings", None),
        "do_lower_case": model.tokenizer.do_lower_case,
        "normalize": model.normalize,
        "instruction_rules": INSTRUCTION_RULES_VERSION,
        "tokenizer": {"file": tokenizer_path(engine).name, "sha256": sha256_file(model.tokenizer.path)},
        **io_spec(model),
        "exporter": tool_versions(
            "instructor-stack", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu13", "tensorrt-cu12"
        ),
        "parity": parity,
    }
    manifest.update(extra or {})
    return manifest
