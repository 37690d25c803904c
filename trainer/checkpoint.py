"""Reading and writing sentence-transformers folders: the hkunlp INSTRUCTOR layout and BERT-family models.

Errors name the file and what is wrong, so that a user with a half-copied checkpoint knows what to fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.errors import CheckpointError

# Encoders this project can run, export and serve; anything else is refused by name.
SUPPORTED_ARCHITECTURES = ("t5", "mt5", "bert", "roberta", "xlm-roberta")
DENSE_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": torch.nn.Identity,
    "torch.nn.modules.activation.Tanh": torch.nn.Tanh,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "vocab.txt",
)


@dataclass
class DenseSpec:
    in_features: int
    out_features: int
    bias: bool
    activation: str
    state: dict[str, torch.Tensor]


@dataclass
class FolderLayout:
    """What ``modules.json`` says, resolved to paths and checked."""

    root: Path
    transformer_dir: Path
    pooling_config: dict[str, Any]
    dense: DenseSpec | None
    normalize: bool
    max_seq_length: int
    do_lower_case: bool


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def load_weights(folder: Path, stem: str = "model") -> dict[str, torch.Tensor]:
    """Load ``model.safetensors`` (preferred) or ``pytorch_model.bin`` with ``weights_only=True`` (never unpickle code)."""
    safet = folder / f"{stem}.safetensors"
    binf = folder / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin")
    if safet.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(safet))
        except Exception as exc:
            raise CheckpointError(f"{safet}: cannot read safetensors weights ({exc})") from exc
    if binf.is_file():
        try:
            return torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{binf}: cannot read weights with torch.load(weights_only=True) ({exc})") from exc
    raise CheckpointError(f"{folder}: no weights (expected {safet.name} or {binf.name})")


def _module_kind(type_name: str, modules_path: Path) -> str:
    short = type_name.rsplit(".", 1)[-1]
    kinds = {
        "Transformer": "transformer",
        "INSTRUCTOR_Transformer": "transformer",
        "Pooling": "pooling",
        "INSTRUCTOR_Pooling": "pooling",
        "Dense": "dense",
        "Normalize": "normalize",
    }
    if short not in kinds:
        raise CheckpointError(
            f"{modules_path}: unknown module type {type_name!r} "
            "(supported: Transformer, Pooling, Dense, Normalize, and InstructorEmbedding's INSTRUCTOR_* variants)"
        )
    return kinds[short]


def _read_dense(folder: Path) -> DenseSpec:
    cfg = read_json(folder / "config.json")
    for key in ("in_features", "out_features"):
        if key not in cfg:
            raise CheckpointError(f"{folder / 'config.json'}: missing field {key!r}")
    activation = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in DENSE_ACTIVATIONS:
        raise CheckpointError(
            f"{folder / 'config.json'}: unsupported activation_function {activation!r} (supported: {sorted(DENSE_ACTIVATIONS)})"
        )
    state = load_weights(folder)
    weight = state.get("linear.weight")
    if weight is None:
        raise CheckpointError(f"{folder}: Dense weights have no 'linear.weight' tensor (keys: {sorted(state)})")
    expected = (int(cfg["out_features"]), int(cfg["in_features"]))
    if tuple(weight.shape) != expected:
        raise CheckpointError(
            f"{folder}: linear.weight has shape {tuple(weight.shape)}, config.json says {expected} (out_features, in_features)"
        )
    bias = bool(cfg.get("bias", True))
    if bias and "linear.bias" not in state:
        raise CheckpointError(f"{folder}: config.json says bias=true but the weights have no 'linear.bias'")
    return DenseSpec(expected[1], expected[0], bias, activation, state)


def read_layout(folder: str | Path) -> FolderLayout:
    """Parse and check a sentence-transformers folder without loading the encoder weights."""
    root = Path(folder)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint folder not found")
    modules_path = root / "modules.json"
    if not modules_path.is_file():
        raise CheckpointError(f"{modules_path}: file not found (not a sentence-transformers folder)")
    modules = read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise CheckpointError(f"{modules_path}: expected a list of {{'type', 'path'}} entries")
    by_kind: dict[str, Path] = {}
    for entry in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = _module_kind(entry["type"], modules_path)
        path = root / entry.get("path", "")
        if kind == "pooling" and not path.is_dir():
            for alt in ("1_Pooling", "1_INSTRUCTOR_Pooling"):
                if (root / alt).is_dir():
                    path = root / alt
        if kind != "normalize" and not path.is_dir():
            raise CheckpointError(f"{modules_path}: module folder {entry.get('path')!r} ({kind}) is missing")
        by_kind[kind] = path
    for kind in ("transformer", "pooling"):
        if kind not in by_kind:
            raise CheckpointError(f"{modules_path}: no {kind.capitalize()} module listed")
    pooling = read_json(by_kind["pooling"] / "config.json")
    modes = {k: v for k, v in pooling.items() if k.startswith("pooling_mode") and v}
    if set(modes) != {"pooling_mode_mean_tokens"}:
        raise CheckpointError(
            f"{by_kind['pooling'] / 'config.json'}: unsupported pooling {sorted(modes)} (only mean pooling is supported)"
        )
    tdir = by_kind["transformer"]
    st_cfg_path = tdir / "sentence_bert_config.json"
    st_cfg = read_json(st_cfg_path) if st_cfg_path.is_file() else {}
    return FolderLayout(
        root=root,
        transformer_dir=tdir,
        pooling_config=pooling,
        dense=_read_dense(by_kind["dense"]) if "dense" in by_kind else None,
        normalize="normalize" in by_kind,
        max_seq_length=int(st_cfg.get("max_seq_length") or 512),
        do_lower_case=bool(st_cfg.get("do_lower_case", False)),
    )


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
