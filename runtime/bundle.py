"""The engine bundle: an engine file with two sidecars, so that one path is enough to run it.

For an engine ``PATH`` (``large.onnx`` or ``large.plan``) the bundle is:

- ``PATH``: the engine itself (an ONNX model, or a serialized TensorRT engine);
- ``PATH.manifest.json``: what it is (see ``Manifest``), written last by the exporter;
- ``PATH.tokenizer.json``: the checkpoint's ``tokenizer.json``, whose sha256 the manifest records;
- for ``.plan`` also ``PATH.onnx``: the ONNX graph it was built from (to rebuild on another GPU).

The runtime reads the manifest and refuses a bundle that is incomplete, corrupt or made for something else
with ``EngineError`` (exit code 2 from the CLI).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.tokenization import INSTRUCTION_RULES_VERSION, InstructionTokenizer

MANIFEST_FORMAT = "instructor-engine/1"
INPUT_NAMES = ("input_ids", "attention_mask", "instruction_count")
OUTPUT_NAME = "sentence_embedding"
ENGINE_KINDS = {".onnx": "onnx", ".plan": "tensorrt"}


class EngineError(RuntimeError):
    """An engine bundle that cannot be used as it is; the message says which file and why."""


def manifest_path(engine: str | Path) -> Path:
    return Path(f"{engine}.manifest.json")


def tokenizer_path(engine: str | Path) -> Path:
    return Path(f"{engine}.tokenizer.json")


def source_onnx_path(engine: str | Path) -> Path:
    return Path(f"{engine}.onnx")


def engine_kind(engine: str | Path) -> str:
    suffix = Path(engine).suffix.lower()
    if suffix not in ENGINE_KINDS:
        raise EngineError(f"{engine}: unknown engine kind {suffix!r} (expected .onnx or .plan)")
    return ENGINE_KINDS[suffix]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temp file in the same folder and rename, so no reader ever sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Manifest:
    """The parsed ``PATH.manifest.json`` of a bundle, with the fields the runtime relies on."""

    engine: Path
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.data["engine"]["kind"]

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def embedding_dim(self) -> int:
        return int(self.data["embedding_dim"])

    @property
    def max_seq_length(self) -> int:
        return int(self.data["max_seq_length"])

    @property
    def do_lower_case(self) -> bool:
        return bool(self.data.get("do_lower_case", False))

    @property
    def sha256(self) -> str:
        """Hash of the manifest file itself: identifies the exact engine a result came from."""
        return sha256_file(manifest_path(self.engine))

    def tokenizer(self) -> InstructionTokenizer:
        return InstructionTokenizer(tokenizer_path(self.engine), self.max_seq_length, self.do_lower_case)


REQUIRED_FIELDS = ("format", "engine", "precision", "embedding_dim", "max_seq_length", "instruction_rules", "tokenizer")


def load_manifest(engine: str | Path, verify_engine_hash: bool = False) -> Manifest:
    """Read and check a bundle's manifest and tokenizer; raise ``EngineError`` naming the file at fault."""
    engine = Path(engine)
    kind = engine_kind(engine)
    if not engine.is_file():
        raise EngineError(f"{engine}: engine file not found")
    mpath = manifest_path(engine)
    if not mpath.is_file():
        raise EngineError(f"{mpath}: manifest not found (export the engine with `python -m export`)")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{mpath}: corrupt manifest ({exc})") from exc
    missing = [f for f in REQUIRED_FIELDS if f not in data]
    if missing:
        raise EngineError(f"{mpath}: manifest lacks {missing}")
    if data["format"] != MANIFEST_FORMAT:
        raise EngineError(f"{mpath}: manifest format {data['format']!r}, this runtime reads {MANIFEST_FORMAT!r}")
    if data["engine"].get("kind") != kind:
        raise EngineError(f"{mpath}: manifest says a {data['engine'].get('kind')} engine, the file is {engine.suffix}")
    if data["instruction_rules"] != INSTRUCTION_RULES_VERSION:
        raise EngineError(
            f"{mpath}: instruction rules {data['instruction_rules']!r}, this runtime implements {INSTRUCTION_RULES_VERSION!r}"
        )
    tpath = tokenizer_path(engine)
    if not tpath.is_file():
        raise EngineError(f"{tpath}: tokenizer sidecar not found")
    if sha256_file(tpath) != data["tokenizer"].get("sha256"):
        raise EngineError(f"{tpath}: tokenizer sha256 differs from the manifest's (the bundle was mixed up)")
    size = data["engine"].get("bytes")
    if size is not None and engine.stat().st_size != size:
        raise EngineError(f"{engine}: {engine.stat().st_size} bytes, the manifest says {size} (truncated or replaced)")
    if verify_engine_hash and sha256_file(engine) != data["engine"].get("sha256"):
        raise EngineError(f"{engine}: sha256 differs from the manifest's (corrupt or replaced)")
    return Manifest(engine=engine, data=data)
