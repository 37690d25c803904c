"""The engine manifest's one schema: what ``python -m export`` writes and what the runtime accepts.

Every top-level field has one line in ``FIELDS``: its check (type and range), whether it is required, and the
engine kinds it belongs to. A field that is not listed is refused at load, so a new manifest field is one new line
here, which both the exporter and the runtime then follow. On top of the per-field checks:

- ``cross_check``: the fields that must agree with each other (the output shape and ``embedding_dim``,
  ``max_seq_length`` and the position table or the compiled engine's profile, the precision and the engine kind);
- the seal (field ``seal``): the exporter stores the sha256 of every field's canonical JSON; a field changed, added
  or removed afterwards no longer matches it, and the load names that field (``broken_seal``);
- the engine record (``RECORD_KEY``): the fields that decide the vectors, written by the exporter into the engine
  file itself where the kind has room for it (ONNX metadata, AOTInductor package metadata), so that the engine's
  sha256 covers them; the backend compares the manifest with it when it opens the engine (``record_mismatch``).

Checks return or raise ``ManifestFieldError`` naming the field (dotted for nested keys); ``runtime.bundle`` adds the
file. Nothing here reads files or imports an engine library.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from runtime.tokenization import INSTRUCTION_RULES_VERSION

MANIFEST_FORMAT = "instructor-engine/2"  # 2: sealed, with the engine record; 1: unsealed (loads only unverified)
LEGACY_FORMAT = "instructor-engine/1"
INPUT_NAMES = ("input_ids", "attention_mask", "instruction_count")
OUTPUT_NAME = "sentence_embedding"
ENGINE_KINDS = {".onnx": "onnx", ".plan": "tensorrt", ".pt2": "pt2"}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
PRECISIONS_BY_KIND = {"onnx": PRECISIONS, "tensorrt": ("fp32", "fp16", "bf16"), "pt2": ("fp32", "fp16", "bf16")}
RECORD_KEY = "instructor_stack.manifest"
MAX_MANIFEST_BYTES = 16 << 20
MAX_WIDTH = 1 << 16  # hidden size, embedding dim
MAX_TOKENS = 1 << 20  # max_seq_length, position table
MAX_VOCAB = 1 << 24
MAX_DEPTH = 16  # nesting of the free-form sections (parity, graph)


class ManifestFieldError(ValueError):
    """One manifest field that is malformed, inconsistent or edited; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def _show(value: Any) -> str:
    """A short, always printable rendering of a JSON value for an error message."""
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    text = json.dumps(value)  # ensure_ascii: a lone surrogate or a control character prints escaped
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(field: str, expected: str, value: Any) -> ManifestFieldError:
    return ManifestFieldError(field, f"manifest field {field!r} must be {expected}, got {_show(value)}")


Check = Callable[[str, Any], None]  # (dotted field name, value); raises ManifestFieldError


def integer(lo: int, hi: int) -> Check:
    def check(name: str, value: Any) -> None:
        if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
            raise _bad(name, f"an integer from {lo} to {hi}", value)

    return check


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _bad(name, "true or false", value)


def text(max_chars: int = 4096) -> Check:
    def check(name: str, value: Any) -> None:
        ok = isinstance(value, str) and 0 < len(value) <= max_chars
        try:
            ok = ok and bool(value.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
            ok = False
        if not ok:
            raise _bad(name, f"a string of 1 to {max_chars} characters", value)

    return check


def one_of(*values: Any) -> Check:
    def check(name: str, value: Any) -> None:
        if not any(type(value) is type(v) and value == v for v in values):
            raise _bad(name, "one of " + ", ".join(json.dumps(v) for v in values), value)

    return check


def digest(name: str, value: Any) -> None:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise _bad(name, "a sha256 (64 hex digits)", value)


def nullable(inner: Check) -> Check:
    def check(name: str, value: Any) -> None:
        if value is not None:
            inner(name, value)

    return check


def number(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise _bad(name, "a number", value)


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion (a hostile manifest nests up to the parser's limit)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def free(max_depth: int = MAX_DEPTH) -> Check:
    """Any JSON object nested at most ``max_depth`` deep: descriptive sections the runtime does not act on."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise _bad(name, "an object", value)
        if depth(value) > max_depth:
            raise _bad(name, f"an object nested at most {max_depth} deep", value)

    return check


def obj(keys: dict[str, tuple[Check, bool]], extra: bool = True) -> Check:
    """An object whose listed keys pass their checks (``(check, required)``); other keys: free-form (if ``extra``)."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise _bad(name, "an object", value)
        for key, (inner, required) in keys.items():
            if key in value:
                inner(f"{name}.{key}", value[key])
            elif required:
                raise ManifestFieldError(f"{name}.{key}", f"manifest field '{name}.{key}' is missing")
        for key, item in value.items():
            if key not in keys:
                if not extra:
                    raise ManifestFieldError(f"{name}.{key}", f"manifest field '{name}.{key}' is not part of {name}")
                free_value(f"{name}.{key}", item)

    return check


def free_value(name: str, value: Any) -> None:
    if depth(value) > MAX_DEPTH:
        raise _bad(name, f"a value nested at most {MAX_DEPTH} deep", value)


def texts_by_name(name: str, value: Any) -> None:
    if not isinstance(value, dict) or len(value) > 256:
        raise _bad(name, "an object of at most 256 names", value)
    for key, item in value.items():
        text(200)(f"{name}.{key}", item)


def digests_by_name(name: str, value: Any) -> None:
    if not isinstance(value, dict) or len(value) > 1024:
        raise _bad(name, "an object of at most 1024 names", value)
    for key, item in value.items():
        digest(f"{name}.{key}", item)


def io_spec(embedding_dim: int) -> dict[str, list[dict[str, Any]]]:
    """The engine's inputs and output (the same for every kind and precision): the manifest's ``inputs``/``outputs``."""
    return {
        "inputs": [
            {"name": INPUT_NAMES[0], "dtype": "int64", "shape": ["batch", "sequence"]},
            {"name": INPUT_NAMES[1], "dtype": "int64", "shape": ["batch", "sequence"]},
            {"name": INPUT_NAMES[2], "dtype": "int64", "shape": ["batch"]},
        ],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", embedding_dim]}],
    }


def inputs_check(name: str, value: Any) -> None:
    if value != io_spec(1)["inputs"]:
        raise _bad(name, f"the inputs {list(INPUT_NAMES)} as int64 [batch, sequence] / [batch]", value)


def outputs_check(name: str, value: Any) -> None:
    ok = isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
    if ok:
        shape = value[0].get("shape")
        ok = (
            {k: v for k, v in value[0].items() if k != "shape"} == {"name": OUTPUT_NAME, "dtype": "float32"}
            and isinstance(shape, list) and len(shape) == 2 and shape[0] == "batch"
        )
        if ok:
            integer(1, MAX_WIDTH)(f"{name}.shape[1]", shape[1])
    if not ok:
        raise _bad(name, f"one output {OUTPUT_NAME!r}, float32 [batch, dim]", value)


def capability(name: str, value: Any) -> None:
    """A CUDA compute capability: "major.minor" (or [major, minor] as early .plan manifests wrote it)."""
    pair = value.split(".") if isinstance(value, str) else value
    if not (isinstance(pair, list) and len(pair) == 2 and all(str(p).isdigit() and len(str(p)) <= 3 for p in pair)):
        raise _bad(name, 'a compute capability ("major.minor")', value)


FILE = (text(1024), False)
SHA = (digest, True)


@dataclass(frozen=True)
class Field:
    check: Check
    required: bool = True
    kinds: tuple[str, ...] | None = None  # the engine kinds it belongs to (required only for them); None: all


# The schema. Adding a manifest field: one line here (its check; required or not; the kinds it belongs to).
FIELDS: dict[str, Field] = {
    "format": Field(one_of(MANIFEST_FORMAT, LEGACY_FORMAT)),
    "created": Field(text(64), required=False),
    "engine": Field(obj({"kind": (one_of(*ENGINE_KINDS.values()), True), "file": FILE,
                         "bytes": (integer(1, 1 << 50), True), "sha256": SHA})),
    "precision": Field(one_of(*PRECISIONS)),
    "source": Field(obj({"checkpoint": (text(), False), "sha256": (digest, False)}), required=False),
    "architecture": Field(text(64)),
    "hidden_size": Field(integer(1, MAX_WIDTH)),
    "embedding_dim": Field(integer(1, MAX_WIDTH)),
    "max_seq_length": Field(integer(1, MAX_TOKENS)),
    "vocab_size": Field(integer(1, MAX_VOCAB)),
    "max_position_embeddings": Field(nullable(integer(1, MAX_TOKENS))),
    "do_lower_case": Field(boolean),
    "normalize": Field(boolean),
    "instruction_rules": Field(one_of(INSTRUCTION_RULES_VERSION)),
    "tokenizer": Field(obj({"file": FILE, "sha256": SHA})),
    "inputs": Field(inputs_check),
    "outputs": Field(outputs_check),
    "exporter": Field(texts_by_name, required=False),
    "parity": Field(free(), required=False),
    "graph": Field(free(), required=False),
    "source_onnx": Field(obj({"file": FILE, "sha256": SHA}), required=False, kinds=("tensorrt",)),
    "tensorrt": Field(obj({"version": (text(64), True), "compute_capability": (capability, True),
                           "device_name": (text(256), False), "strongly_typed": (boolean, False), "tf32": (boolean, False),
                           "profile": (free(4), True), "timing_cache": (text(), False)}), kinds=("tensorrt",)),
    "pt2": Field(obj({"format": (one_of("aoti"), False), "torch": (text(64), True), "device": (one_of("cpu", "cuda"), True),
                      "compute_capability": (text(16), False), "device_name": (text(256), False), "cuda": (text(64), False),
                      "max_batch": (integer(1, 1 << 20), False), "max_seq_length": (integer(1, MAX_TOKENS), False),
                      "tf32_islands": (boolean, False), "export_seconds": (number, False), "compile_seconds": (number, False)}),
                 kinds=("pt2",)),
    "rebuilt_from": Field(obj({"engine": (text(), True), "manifest_sha256": SHA}), required=False, kinds=("tensorrt",)),
    "cpu_engines": Field(free(), required=False, kinds=("onnx",)),  # --precision auto; read by runtime.cpu_engines
    "seal": Field(obj({"fields": (digests_by_name, True)}, extra=False)),
}
LEGACY_REQUIRED = ("format", "engine", "precision", "embedding_dim", "max_seq_length", "instruction_rules", "tokenizer")


def validate(data: Any, kind: str) -> None:
    """Every field of a parsed manifest for an engine of ``kind``: present when required, of its type and range,
    known to this schema, and consistent with the others; ``ManifestFieldError`` on the first that is not."""
    if not isinstance(data, dict):
        raise ManifestFieldError("", f"a manifest is a JSON object, this is {_show(data)}")
    if "format" not in data:
        raise ManifestFieldError("format", "manifest field 'format' is missing")
    FIELDS["format"].check("format", data["format"])
    legacy = data["format"] == LEGACY_FORMAT
    for name, spec in FIELDS.items():
        applies = spec.kinds is None or kind in spec.kinds
        if name in data:
            if not applies:
                raise ManifestFieldError(name, f"manifest field {name!r} belongs to {' / '.join(spec.kinds or ())} engines, not {kind}")
            spec.check(name, data[name])
        elif applies and spec.required and (not legacy or name in LEGACY_REQUIRED):
            raise ManifestFieldError(name, f"manifest field {name!r} is missing")
    unknown = [name for name in data if name not in FIELDS]
    if unknown:
        raise ManifestFieldError(unknown[0], f"manifest field {unknown[0]!r} is unknown to this runtime (format {data['format']})")
    cross_check(data, kind)


def profile_max_seq(profile: Any) -> int | None:
    """The longest sequence a TensorRT profile (``tensorrt.profile``) accepts, or None if it does not say."""
    try:
        value = profile["input_ids"]["max"][1]
    except (KeyError, IndexError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def cross_check(data: dict[str, Any], kind: str) -> None:
    """The fields that must agree with each other and with the engine kind."""
    if data["engine"]["kind"] != kind:
        raise ManifestFieldError("engine.kind", f"manifest field 'engine.kind' says a {data['engine']['kind']} engine, the file is a {kind} engine")
    allowed = PRECISIONS_BY_KIND.get(kind, PRECISIONS)
    if data["precision"] not in allowed:
        raise ManifestFieldError("precision", f"manifest field 'precision' = {data['precision']!r}: {kind} engines are {', '.join(allowed)}")
    dim = data["embedding_dim"]
    if "outputs" in data and data["outputs"][0]["shape"][1] != dim:
        raise ManifestFieldError(
            "outputs", f"manifest field 'outputs' gives dimension {data['outputs'][0]['shape'][1]}, 'embedding_dim' says {dim}"
        )
    length = data["max_seq_length"]
    limits = [
        ("max_position_embeddings", data.get("max_position_embeddings"), "the model's position table"),
        ("tensorrt.profile", profile_max_seq(data.get("tensorrt", {}).get("profile")), "the TensorRT profile's longest sequence"),
        ("pt2.max_seq_length", data.get("pt2", {}).get("max_seq_length"), "the longest sequence the .pt2 was compiled for"),
    ]
    for name, limit, what in limits:
        if limit is not None and length > limit:
            raise ManifestFieldError(
                "max_seq_length", f"manifest field 'max_seq_length' = {length} is past {what} (manifest field {name!r} = {limit})"
            )


# -- the seal -------------------------------------------------------------------------------------------------------


def canonical(value: Any) -> str:
    """One text per JSON value (sorted keys, no spaces, ASCII): what the seal hashes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def field_digest(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode("ascii")).hexdigest()


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as it will read back from JSON, with ``seal``: the digest of each of its fields."""
    sealed = json.loads(json.dumps({k: v for k, v in data.items() if k != "seal"}))  # tuples -> lists, as on reload
    sealed["seal"] = {"fields": {name: field_digest(value) for name, value in sealed.items()}}
    return sealed


def broken_seal(data: dict[str, Any]) -> str | None:
    """A sentence naming the fields changed, added or removed since ``seal`` was computed, or None if none was."""
    sealed = data.get("seal", {}).get("fields", {})
    present = {k: v for k, v in data.items() if k != "seal"}
    changed = [k for k in present if k in sealed and sealed[k] != field_digest(present[k])]
    added = [k for k in present if k not in sealed]
    removed = [k for k in sealed if k not in present]
    parts = [f"{what} {', '.join(repr(k) for k in names)}" for what, names in
             (("changed", changed), ("added", added), ("removed", removed)) if names]
    if not parts:
        return None
    return f"manifest field(s) {'; '.join(parts)} after export (the manifest no longer matches its seal)"


# -- the engine record ------------------------------------------------------------------------------------------------

# Facts about the graph: a manifest must agree with the engine on them even when loaded unverified.
FACT_FIELDS = ("architecture", "hidden_size", "embedding_dim", "vocab_size", "max_position_embeddings", "inputs", "outputs")
# What the export decided and the gate checked: compared when the bundle is verified (the default).
SETTING_FIELDS = ("precision", "max_seq_length", "do_lower_case", "normalize", "instruction_rules", "tokenizer.sha256")


def _get(data: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def make_record(data: dict[str, Any], weight_types: Iterable[str] | None = None) -> dict[str, Any]:
    """What the exporter writes into the engine: the fact and setting fields, and the graph's weight types."""
    record: dict[str, Any] = {"format": MANIFEST_FORMAT}
    record.update({name: _get(data, name) for name in FACT_FIELDS + SETTING_FIELDS})
    if weight_types is not None:
        record["weight_types"] = sorted(set(weight_types))
    return record


def weights_fit(precision: str, weight_types: Iterable[str]) -> bool:
    """Whether a graph with initializers of ``weight_types`` (ONNX type names, lower case) can be ``precision``."""
    types = set(weight_types)
    low = {"fp16": {"float16"}, "bf16": {"bfloat16"}, "int8": {"int8", "uint8"}}
    others = set().union(*(v for k, v in low.items() if k != precision)) - low.get(precision, set())
    return not (types & others) and (precision == "fp32" or bool(types & low[precision]))


def parse_record(raw: str | None) -> dict[str, Any] | None:
    """The engine's record from its metadata text (None when the engine has none); ``ManifestFieldError`` if unreadable."""
    if raw is None:
        return None
    try:
        record = json.loads(raw) if len(raw) <= 1 << 20 else None
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict) or record.get("format") != MANIFEST_FORMAT:
        raise ManifestFieldError(RECORD_KEY, f"the engine's own record ({RECORD_KEY}) is unreadable")
    return record


def record_mismatch(data: dict[str, Any], record: dict[str, Any], verified: bool) -> str | None:
    """The first way the manifest ``data`` disagrees with the engine's ``record`` (facts always; settings when
    ``verified``), as a sentence naming the field; None when they agree."""
    names = FACT_FIELDS + (SETTING_FIELDS if verified else ())
    for name in names:  # a field the manifest lacks (a legacy or partial manifest) has nothing to disagree with
        if name in record and name.split(".")[0] in data and _get(data, name) != record[name]:
            return (
                f"manifest field {name!r} = {_show(_get(data, name))}, but the engine itself was exported with "
                f"{_show(record[name])} (the manifest was edited, or belongs to another engine)"
            )
    weights = record.get("weight_types")
    if weights is not None and "precision" in data and not weights_fit(data["precision"], weights):
        return f"manifest field 'precision' = {data['precision']!r} does not fit the graph's weight types {weights}"
    return None
