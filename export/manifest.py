"""The manifest an exporter writes beside every engine, and the record it writes into the engine itself.

Both follow the one schema in ``runtime.manifest_schema``, by which the runtime reads them. ``model_fields`` are the
fields that describe the model and decide the vectors; the engine record (``onnx_record``, or the ``.pt2``
package's metadata) holds them inside the engine, where the engine's sha256 covers them; the seal
(``runtime.manifest_schema.seal``) covers every field of the manifest.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata as md
import json
from pathlib import Path
from typing import Any

import onnx

from runtime import manifest_schema as schema
from runtime.bundle import MANIFEST_FORMAT, sha256_file, tokenizer_path
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
    return schema.io_spec(model.embedding_dim)


def model_fields(model: InstructorModel, precision: str) -> dict[str, Any]:
    """The manifest fields that describe the model and the export's settings (what the engine record holds)."""
    return {
        "precision": precision,
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
        "tokenizer": {"sha256": sha256_file(model.tokenizer.path)},
        **io_spec(model),
    }


def engine_record(model: InstructorModel, precision: str, weight_types: list[str] | None = None) -> str:
    """The record text for an engine's metadata (key ``runtime.manifest_schema.RECORD_KEY``)."""
    return json.dumps(schema.make_record(model_fields(model, precision), weight_types), sort_keys=True)


def onnx_weight_types(graph: onnx.ModelProto) -> list[str]:
    """The element types of a graph's initializers as lower-case ONNX names (``float``, ``float16``, ``int8``...)."""
    return sorted({onnx.TensorProto.DataType.Name(t.data_type).lower() for t in graph.graph.initializer})


def onnx_record(path: Path, model: InstructorModel, precision: str) -> None:
    """Write the engine record into the ONNX file's metadata, with the weight types read from its graph.

    Only the metadata changes (no node, no weight), so the file stays the graph that passed the parity gate.
    """
    graph = onnx.load(str(path))
    types = onnx_weight_types(graph)
    if not schema.weights_fit(precision, types):
        raise RuntimeError(f"{path}: a {precision} engine with weights of types {types} (an exporter bug)")
    for entry in [e for e in graph.metadata_props if e.key == schema.RECORD_KEY]:
        graph.metadata_props.remove(entry)
    graph.metadata_props.add(key=schema.RECORD_KEY, value=engine_record(model, precision, types))
    onnx.save(graph, str(path))


def build_manifest(
    model: InstructorModel,
    checkpoint: str | Path,
    engine: Path,
    precision: str,
    kind: str,
    parity: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a runtime (or a person) needs to know about an engine, parity figures included; sealed, and
    checked against the schema before anything is written."""
    fields = model_fields(model, precision)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "engine": {"kind": kind, "file": engine.name, "bytes": engine.stat().st_size, "sha256": sha256_file(engine)},
        "source": {"checkpoint": str(Path(checkpoint).resolve()), "sha256": checkpoint_sha256(checkpoint)},
        **fields,
        "tokenizer": {"file": tokenizer_path(engine).name, **fields["tokenizer"]},
        "exporter": tool_versions(
            "instructor-stack", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu13", "tensorrt-cu12"
        ),
        "parity": parity,
    }
    manifest.update(extra or {})
    sealed = schema.seal(manifest)
    schema.validate(sealed, kind)
    return sealed
