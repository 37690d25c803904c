"""What the quality benchmarks (MTEB, Billboard, prompt retrieval) encode with: an engine or a checkpoint.

One loader for all three, so that each scores the same thing the same way: an engine file runs through
``runtime.Encoder`` (no torch), a checkpoint folder through the PyTorch reference model (= InstructorEmbedding
1.0.1). Both offer ``INSTRUCTOR.encode``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

NO_INSTRUCTIONS = "none"
DEFAULT_INSTRUCTOR_TABLE = "hkunlp/instructor-large"


class SentenceEncoder(Protocol):
    """What both ``runtime.Encoder`` and ``trainer.InstructorModel`` offer (the ``INSTRUCTOR.encode`` form)."""

    def encode(self, sentences: Any, batch_size: int = 32, show_progress_bar: bool | None = None, **kwargs: Any) -> Any: ...


ENGINE_SUFFIXES = (".onnx", ".plan", ".pt2")


def load_encoder(path: str | Path, cache_dir: str | Path | None = None, precision: str = "auto") -> tuple[SentenceEncoder, dict[str, Any]]:
    """An engine file through ``runtime.Encoder``, or a checkpoint folder through the PyTorch reference model.

    ``precision``: the engine of a ``--precision auto`` bundle to evaluate (``runtime.cpu_engines``); ``auto``: the
    one this CPU runs.

    A name that is neither, such as ``hkunlp/instructor-large``, is looked up where InstructorEmbedding's stack
    downloaded it (``cache_dir``, then the default caches: ``trainer.model_source``); nothing is downloaded.
    Returns the encoder and a description (kind, precision, architecture, embedding_dim) for the result files.
    """
    path = Path(path)
    if not path.exists() and path.suffix not in ENGINE_SUFFIXES:
        from trainer.model_source import local_model_folder

        path = local_model_folder(str(path), cache_dir)
    if path.is_dir():
        from trainer.model import InstructorModel

        model = InstructorModel.from_pretrained(path)
        info = {"kind": "pytorch", "precision": "fp32", "architecture": model.architecture, "embedding_dim": model.embedding_dim}
        return model, info
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no engine file or checkpoint folder here")
    try:
        from runtime import Encoder
    except ImportError as exc:
        raise RuntimeError(f"{path}: running an engine needs runtime.Encoder, which this checkout lacks ({exc})") from exc
    encoder = Encoder(str(path), precision=precision)
    data = encoder.manifest.data
    info = {
        "kind": data["engine"]["kind"],
        "precision": encoder.engine_choice.precision,
        "engine_choice": encoder.engine_choice.as_dict(),
        "architecture": data.get("architecture"),
        "embedding_dim": encoder.embedding_dim,
        "manifest_sha256": encoder.manifest.sha256,
    }
    return encoder, info


def default_table(architecture: str | None) -> str:
    """INSTRUCTOR models are T5 encoders and get the instructor-large table; anything else (e.g. MiniLM) plain text."""
    return DEFAULT_INSTRUCTOR_TABLE if architecture in ("t5", "mt5") else NO_INSTRUCTIONS
