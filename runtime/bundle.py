"""The engine bundle: an engine file with two sidecars, so that one path is enough to run it.

For an engine ``PATH`` (``large.onnx``, ``large.plan`` or ``large.pt2``) the bundle is:

- ``PATH``: the engine itself (an ONNX model, a serialized TensorRT engine, or an AOTInductor package);
- ``PATH.manifest.json``: what it is (schema: ``runtime.manifest_schema``), written last by the exporter;
- ``PATH.tokenizer.json``: the checkpoint's ``tokenizer.json``, whose sha256 the manifest records;
- for ``.plan`` also ``PATH.onnx``: the ONNX graph it was built from (to rebuild on another GPU).

The runtime reads the manifest and refuses a bundle that is incomplete, corrupt, edited or made for something else
with ``EngineError`` (exit code 2 from the CLIs), naming the file and the field: missing sidecars, a manifest field
of the wrong type or range or at odds with another, a field changed after export (the manifest's seal), a tokenizer
whose ids pass the model's vocabulary, an engine file whose sha256 is not the manifest's (hashed once per file
version, see ``verify_engine_file``), and, when the backend opens the engine, a manifest that disagrees with what
the engine says of itself (``Manifest.check_engine``). ``verify_engine=False`` (``--no-verify-engine``) skips the
integrity checks (engine hash, seal, the engine's record of the export settings), never the validation.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from runtime import manifest_schema as schema
from runtime.files.atomic import atomic_write_text
from runtime.manifest_schema import ENGINE_KINDS, INPUT_NAMES, MANIFEST_FORMAT, OUTPUT_NAME, ManifestFieldError
from runtime.tokenization import InstructionTokenizer

__all__ = ["ENGINE_KINDS", "INPUT_NAMES", "MANIFEST_FORMAT", "OUTPUT_NAME", "EngineError", "Manifest", "load_manifest"]
UNVERIFIED = "load it unverified with --no-verify-engine (Encoder(..., verify_engine=False))"
CHECKPOINT_FILES = ("modules.json", "config_sentence_transformers.json", "config.json")


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
        what = f"unknown engine kind {suffix!r}" if suffix else "no engine extension"
        raise EngineError(f"{engine}: {what} (an engine file ends in {', '.join(ENGINE_KINDS)})")
    return ENGINE_KINDS[suffix]


def bundle_files(engine: str | Path) -> list[Path]:
    """The files of ``engine``'s bundle that travel together (``PATH.onnx`` too for a ``.plan``)."""
    files = [Path(engine), manifest_path(engine), tokenizer_path(engine)]
    if Path(engine).suffix.lower() == ".plan":
        files.append(source_onnx_path(engine))
    return files


def _bundle_hint(engine: Path) -> str:
    names = ", ".join(p.name for p in bundle_files(engine))
    return (f"an engine is a bundle of files that must stay together in one folder: {names} (copy all of them, "
            "or export again with python -m export)")


def _check_engine_path(engine: Path) -> None:
    """A path that is not an engine file gets a message that says what it is and what to pass instead."""
    if engine.is_dir():
        if any((engine / name).is_file() for name in CHECKPOINT_FILES):
            raise EngineError(
                f"{engine}: this is a checkpoint folder, not an engine: export it first "
                f"(python -m export {engine} --out NAME.onnx) and pass NAME.onnx"
            )
        inside = sorted(p.name for p in engine.iterdir() if p.suffix.lower() in ENGINE_KINDS and manifest_path(p).is_file())
        hint = f"; it holds {', '.join(inside[:5])}: pass one of them" if inside else ""
        raise EngineError(f"{engine}: a folder, not an engine file (NAME{', NAME'.join(ENGINE_KINDS)}){hint}")
    engine_kind(engine)
    if not engine.is_file():
        raise EngineError(f"{engine}: engine file not found")


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
    """The parsed ``PATH.manifest.json`` of a bundle, with the fields the runtime relies on.

    ``verified``: loaded with the integrity checks (the default), so ``check_engine`` also compares the export's
    settings recorded inside the engine.
    """

    engine: Path
    data: dict[str, Any]
    verified: bool = False
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

    def check_engine(
        self,
        inputs: Iterable[str],
        output: str,
        output_dim: Any = None,
        record: str | None = None,
        carries_record: bool = False,
    ) -> None:
        """What an opened engine says of itself against the manifest; ``EngineError`` naming the field that differs.

        ``inputs``/``output``: the engine's tensor names; ``output_dim``: its output width when the engine states
        it (an int); ``record``: the metadata text the exporter wrote into engines that have room for it
        (``carries_record``: ONNX, ``.pt2``). Facts about the graph are compared always, the export's settings when
        the bundle was loaded verified. Fields a partial manifest (the exporter's own check) lacks are skipped.
        """
        names = sorted(inputs)
        if names != sorted(INPUT_NAMES) or output != OUTPUT_NAME:
            raise EngineError(
                f"{self.engine}: engine inputs {names} / output {output!r}, expected {list(INPUT_NAMES)} / {OUTPUT_NAME!r}"
            )
        dim = self.data.get("embedding_dim")
        if isinstance(output_dim, int) and dim is not None and output_dim != dim:
            raise EngineError(
                f"{manifest_path(self.engine)}: manifest field 'embedding_dim' = {dim}, the engine's output has {output_dim}"
            )
        try:
            parsed = schema.parse_record(record)
        except ManifestFieldError as exc:
            raise EngineError(f"{self.engine}: {exc} (re-export the engine)") from None
        if parsed is None:
            if carries_record and self.verified:
                raise EngineError(
                    f"{self.engine}: the engine carries no record of its export ({schema.RECORD_KEY}), so the "
                    f"manifest cannot be checked against it: re-export the engine, or {UNVERIFIED}"
                )
            return
        mismatch = schema.record_mismatch(self.data, parsed, self.verified)
        if mismatch:
            raise EngineError(f"{manifest_path(self.engine)}: {mismatch}")


def _read_manifest(mpath: Path) -> Any:
    """The parsed manifest; ``EngineError`` for a file too large, not UTF-8, not JSON, or nested past the parser."""
    try:
        size = mpath.stat().st_size
        if size > schema.MAX_MANIFEST_BYTES:
            raise EngineError(f"{mpath}: corrupt manifest ({size} bytes; a manifest is at most {schema.MAX_MANIFEST_BYTES})")
        return json.loads(mpath.read_bytes().decode("utf-8"))
    except RecursionError:
        raise EngineError(f"{mpath}: corrupt manifest (JSON nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit
        raise EngineError(f"{mpath}: corrupt manifest ({str(exc)[:200]})") from None


def _check_vocabulary(mpath: Path, data: dict[str, Any], tokenizer: InstructionTokenizer) -> None:
    """Token ids the engine's embedding table can hold (else ONNX Runtime fails deep inside a run)."""
    vocab = data.get("vocab_size")
    if vocab is not None and tokenizer.max_token_id >= vocab:
        raise EngineError(
            f"{mpath}: the tokenizer has token ids up to {tokenizer.max_token_id}, past the model's vocabulary "
            f"(manifest field 'vocab_size' = {vocab})"
        )


def load_manifest(engine: str | Path, verify_engine: bool = True) -> Manifest:
    """Read and check a bundle's manifest and tokenizer; raise ``EngineError`` naming the file (and field) at fault.

    Always: the bundle's files, every manifest field (``runtime.manifest_schema``), the tokenizer's sha256 and ids.
    With ``verify_engine`` (the default) also the manifest's seal and the engine file's sha256.
    """
    engine = Path(engine)
    _check_engine_path(engine)
    mpath = manifest_path(engine)
    if not mpath.is_file():
        raise EngineError(f"{mpath}: manifest not found; {_bundle_hint(engine)}")
    data = _read_manifest(mpath)
    try:
        schema.validate(data, engine_kind(engine))
    except ManifestFieldError as exc:
        raise EngineError(f"{mpath}: {exc}") from None
    if data["format"] == schema.LEGACY_FORMAT and verify_engine:
        raise EngineError(
            f"{mpath}: manifest format {schema.LEGACY_FORMAT} carries no seal, so an edit cannot be told from the "
            f"export: re-export the engine (format {MANIFEST_FORMAT}), or {UNVERIFIED}"
        )
    tpath = tokenizer_path(engine)
    if not tpath.is_file():
        raise EngineError(f"{tpath}: tokenizer sidecar not found; {_bundle_hint(engine)}")
    if sha256_file(tpath) != data["tokenizer"]["sha256"]:
        raise EngineError(f"{tpath}: tokenizer sha256 differs from the manifest's (the bundle was mixed up)")
    size = data["engine"]["bytes"]
    if engine.stat().st_size != size:
        raise EngineError(f"{engine}: {engine.stat().st_size} bytes, the manifest says {size} (truncated or replaced)")
    manifest = Manifest(engine=engine, data=data, verified=verify_engine)
    _check_vocabulary(mpath, data, manifest.tokenizer())
    if verify_engine:
        broken = schema.broken_seal(data)
        if broken:
            raise EngineError(f"{mpath}: {broken}; re-export the engine, or {UNVERIFIED}")
        verify_engine_file(engine, data["engine"]["sha256"])
    return manifest
