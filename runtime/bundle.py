"""The engine bundle: an engine file with two sidecars, so that one path is enough to run it.

For an engine ``PATH`` (``large.onnx``, ``large.plan`` or ``large.pt2``) the bundle is:

- ``PATH``: the engine itself (an ONNX model, a serialized TensorRT engine, or an AOTInductor package);
- ``PATH.manifest.json``: what it is (see ``Manifest``), written last by the exporter;
- ``PATH.tokenizer.json``: the checkpoint's ``tokenizer.json``, whose sha256 the manifest records;
- for ``.plan`` also ``PATH.onnx``: the ONNX graph it was built from (to rebuild on another GPU).

The runtime reads the manifest and refuses a bundle that is incomplete, corrupt or made for something else
with ``EngineError`` (exit code 2 from the CLI): missing sidecars, a manifest field of the wrong type, a tokenizer
whose ids pass the model's vocabulary, a ``max_seq_length`` past the position table, and an engine file whose
sha256 is not the manifest's (hashed once per file version, see ``verify_engine_file``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.atomic import atomic_write_text
from runtime.tokenization import INSTRUCTION_RULES_VERSION, InstructionTokenizer

MANIFEST_FORMAT = "instructor-engine/1"
INPUT_NAMES = ("input_ids", "attention_mask", "instruction_count")
OUTPUT_NAME = "sentence_embedding"
ENGINE_KINDS = {".onnx": "onnx", ".plan": "tensorrt", ".pt2": "pt2"}


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
        raise EngineError(f"{engine}: unknown engine kind {suffix!r} (expected {', '.join(ENGINE_KINDS)})")
    return ENGINE_KINDS[suffix]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """The project's cache folder (``$XDG_CACHE_HOME/instructor-stack``, default ``~/.cache/instructor-stack``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "instructor-stack"


VERIFIED_CACHE_FILE = "verified-engines.json"
VERIFIED_CACHE_ENTRIES = 256


def _file_stamp(path: Path) -> list[int]:
    """What changes whenever a file's bytes may have changed: ctime cannot be set back by a user, unlike mtime."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def verify_engine_file(engine: Path, expected_sha256: str | None) -> bool:
    """Check the engine's sha256 against the manifest's; ``EngineError`` if it differs. True when it was hashed.

    A verified file is remembered in the cache by path and stamp (size, mtime, ctime, inode, device), so only the
    first load of each version of a file pays for hashing. An unwritable cache only costs the hashing again.
    """
    if not isinstance(expected_sha256, str):
        raise EngineError(f"{manifest_path(engine)}: manifest field 'engine.sha256' is missing (re-export the engine)")
    cache = cache_dir() / VERIFIED_CACHE_FILE
    key, stamp = str(engine.resolve()), _file_stamp(engine)
    try:
        entries = json.loads(cache.read_text(encoding="utf-8"))
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    if entries.get(key) == {"stamp": stamp, "sha256": expected_sha256}:
        return False
    if sha256_file(engine) != expected_sha256:
        raise EngineError(f"{engine}: sha256 differs from the manifest's (corrupt or replaced); re-export the engine")
    entries.pop(key, None)
    entries[key] = {"stamp": stamp, "sha256": expected_sha256}
    try:
        atomic_write_text(cache, json.dumps(dict(list(entries.items())[-VERIFIED_CACHE_ENTRIES:])))
    except OSError:
        pass
    return True


@dataclass
class Manifest:
    """The parsed ``PATH.manifest.json`` of a bundle, with the fields the runtime relies on."""

    engine: Path
    data: dict[str, Any]
    _tokenizer: InstructionTokenizer | None = field(default=None, repr=False, compare=False)

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
        """The bundle's tokenizer (loaded once per manifest)."""
        if self._tokenizer is None:
            self._tokenizer = InstructionTokenizer(tokenizer_path(self.engine), self.max_seq_length, self.do_lower_case)
        return self._tokenizer


REQUIRED_FIELDS = ("format", "engine", "precision", "embedding_dim", "max_seq_length", "instruction_rules", "tokenizer")


def _check_types(mpath: Path, data: dict[str, Any]) -> None:
    """Every field the runtime reads has the type it expects; an edited manifest fails here, naming the field."""

    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    checks = [
        ("engine", data["engine"], lambda v: isinstance(v, dict), "an object"),
        ("engine.kind", data["engine"].get("kind") if isinstance(data["engine"], dict) else None,
         lambda v: isinstance(v, str), "a string"),
        ("engine.bytes", data["engine"].get("bytes") if isinstance(data["engine"], dict) else None,
         lambda v: v is None or positive_int(v), "a positive integer"),
        ("precision", data["precision"], lambda v: isinstance(v, str), "a string"),
        ("embedding_dim", data["embedding_dim"], positive_int, "a positive integer"),
        ("max_seq_length", data["max_seq_length"], positive_int, "a positive integer"),
        ("do_lower_case", data.get("do_lower_case", False), lambda v: isinstance(v, bool), "true or false"),
        ("tokenizer", data["tokenizer"], lambda v: isinstance(v, dict), "an object"),
        ("vocab_size", data.get("vocab_size"), lambda v: v is None or positive_int(v), "a positive integer"),
        ("max_position_embeddings", data.get("max_position_embeddings"),
         lambda v: v is None or positive_int(v), "a positive integer or null"),
    ]
    for name, value, ok, expected in checks:
        if not ok(value):
            raise EngineError(f"{mpath}: manifest field {name!r} must be {expected}, got {json.dumps(value)[:60]}")


def _check_model_limits(mpath: Path, data: dict[str, Any], tokenizer: InstructionTokenizer) -> None:
    """Token ids and lengths the engine's tables can hold (else ONNX Runtime fails deep inside a run)."""
    vocab = data.get("vocab_size")
    if vocab is not None and tokenizer.max_token_id >= vocab:
        raise EngineError(
            f"{mpath}: the tokenizer has token ids up to {tokenizer.max_token_id}, past the model's vocabulary "
            f"(manifest field 'vocab_size' = {vocab})"
        )
    positions = data.get("max_position_embeddings")
    if positions is not None and data["max_seq_length"] > positions:
        raise EngineError(
            f"{mpath}: manifest field 'max_seq_length' = {data['max_seq_length']} is past the model's position table "
            f"(manifest field 'max_position_embeddings' = {positions})"
        )


def load_manifest(engine: str | Path, verify_engine: bool = True) -> Manifest:
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
    if not isinstance(data, dict):
        raise EngineError(f"{mpath}: corrupt manifest (a JSON object expected, got {type(data).__name__})")
    missing = [f for f in REQUIRED_FIELDS if f not in data]
    if missing:
        raise EngineError(f"{mpath}: manifest lacks {missing}")
    _check_types(mpath, data)
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
    manifest = Manifest(engine=engine, data=data)
    _check_model_limits(mpath, data, manifest.tokenizer())
    if verify_engine:
        verify_engine_file(engine, data["engine"].get("sha256"))
    return manifest
