"""``runtime.INSTRUCTOR``: InstructorEmbedding 1.0.1's ``INSTRUCTOR`` class on an exported engine, without torch.

Code written against the original (``model = INSTRUCTOR(...); model.encode(...)``) runs unchanged on an engine
file. Each ``encode`` argument means what it means in 1.0.1; where an engine cannot do what 1.0.1 does, the error
says so and names the way that can:

- an engine's graph pools inside, so it gives sentence embeddings only: ``output_value='token_embeddings'`` (or
  ``None``) names the PyTorch class, ``trainer.INSTRUCTOR``;
- ``normalize_embeddings=False`` returns what the checkpoint returns: the graph normalizes exactly when the
  checkpoint lists a Normalize module (the manifest's ``normalize``), as 1.0.1's module list does;
- ``convert_to_tensor=True`` and ``convert_to_numpy=False`` return torch tensors (on the CPU), so they import
  torch at that call and say so when it is not installed; nothing else here touches torch.

``ELSEWHERE`` maps the original's methods this project offers another way (``fit``, ``encode_multi_process`` ...)
to that way; ``trainer.INSTRUCTOR`` uses it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.bundle import EngineError
from runtime.encoder import Encoder
from runtime.tokenization import InputItem

_TRAIN = "train with `python -m trainer`, which takes upstream train.py's command line (docs/training.md)"
_ENCODE_BIG = "encode large inputs with `python -m runtime.encode` (resumable), on many GPUs with --ray (docs/distributed.md)"
_UPLOAD = "nothing is uploaded from here: upload the folder written by trainer.INSTRUCTOR.save, or the engine bundle, yourself"
ELSEWHERE = {
    "fit": _TRAIN,
    "smart_batching_collate": _TRAIN,
    "evaluate": "score with `python -m bench.quality.mteb --engine ENGINE_OR_FOLDER --category sts|retrieval|...|all --data-dir DATA_DIR` (docs/evaluation.md)",
    "encode_multi_process": _ENCODE_BIG,
    "start_multi_process_pool": _ENCODE_BIG,
    "stop_multi_process_pool": _ENCODE_BIG,
    "save_to_hub": _UPLOAD,
    "push_to_hub": _UPLOAD,
}
TOKEN_OUTPUT_HINT = (
    "an engine outputs sentence embeddings only (its graph pools, projects and normalizes inside); per-token "
    "vectors come from the PyTorch model: `from trainer import INSTRUCTOR; "
    "INSTRUCTOR('path/to/checkpoint').encode(..., output_value='token_embeddings')`"
)


def elsewhere_error(cls: str, name: str) -> AttributeError | None:
    """The error for one of the original's methods that this project offers another way, or None."""
    hint = ELSEWHERE.get(name)
    return AttributeError(f"{cls}.{name} is not offered here: {hint}") if hint else None


def _torch(what: str) -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            f"{what} returns torch tensors and needs torch, which is not installed (pip install torch); "
            "the default, convert_to_numpy=True, returns numpy without it"
        ) from exc
    return torch


class INSTRUCTOR:
    """``INSTRUCTOR(engine, device=None, cache_folder=None)``: an engine file (``.onnx``, ``.plan``, ``.pt2``) behind 1.0.1's API.

    ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (default: the backend's choice, CUDA when onnxruntime-gpu
    sees a GPU). ``cache_folder`` is accepted and unused, as 1.0.1 ignores it for a local path; other keyword
    arguments go to ``runtime.Encoder`` (e.g. ``intra_op_threads``, ``max_tokens``). A checkpoint folder or a hub
    name is refused with the command that exports it and the class that runs it with PyTorch.
    """

    def __init__(
        self,
        model_name_or_path: str | Path,
        device: str | None = None,
        cache_folder: str | Path | None = None,
        **encoder_options: Any,
    ) -> None:
        path = Path(model_name_or_path)
        if not path.is_file():
            what = "a folder" if path.is_dir() else "not a file here (a hub name?)"
            raise EngineError(
                f"runtime.INSTRUCTOR({str(model_name_or_path)!r}): {what}; this class runs an exported engine file "
                "and never downloads. Export the checkpoint folder once (`python -m export path/to/instructor-large "
                "--out instructor-large.onnx`) and pass the .onnx, or run the folder with PyTorch: "
                "`from trainer import INSTRUCTOR; INSTRUCTOR('path/to/instructor-large')`"
            )
        self._options = encoder_options
        self.encoder = Encoder(path, device=None if device is None else str(device), **encoder_options)
        self._device = self.encoder.device if device is None else str(device)

    def __getattr__(self, name: str) -> Any:
        error = elsewhere_error("runtime.INSTRUCTOR", name)
        if error is None:
            raise AttributeError(f"'INSTRUCTOR' object has no attribute {name!r}")
        raise error

    def __repr__(self) -> str:
        return f"INSTRUCTOR({str(self.encoder.manifest.engine)!r}, device={self._device!r})"

    @property
    def device(self) -> str:
        """Where the engine runs: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
        return self._device

    @property
    def max_seq_length(self) -> int:
        """Tokens a text is cut at; settable (``model.max_seq_length = 256``) up to the engine's exported length."""
        return self.encoder.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.encoder.max_seq_length = value

    def get_max_seq_length(self) -> int:
        """``max_seq_length``, as sentence-transformers names it."""
        return self.max_seq_length

    def get_sentence_embedding_dimension(self) -> int:
        """The length of one embedding."""
        return self.encoder.embedding_dim

    def tokenize(self, texts: Sequence[InputItem]) -> dict[str, np.ndarray]:
        """The padded int64 arrays the engine takes (numpy here; 1.0.1 returns torch tensors)."""
        return self.encoder.tokenizer(texts)

    def to(self, device: str) -> "INSTRUCTOR":
        """Run on ``device`` from now on, as ``model.to(device)`` does in 1.0.1 (the engine is opened there)."""
        name = str(device)
        if name != self._device:
            moved = Encoder(self.encoder.manifest.engine, device=name, **self._options)
            moved.tokenizer = self.encoder.tokenizer  # keeps a max_seq_length set before
            self.encoder.close()
            self.encoder, self._device = moved, name
        return self

    def encode(
        self,
        sentences: str | Sequence[InputItem],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: str | None = "sentence_embedding",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | None = None,
        normalize_embeddings: bool = False,
    ) -> Any:
        """``INSTRUCTOR.encode`` of InstructorEmbedding 1.0.1 (see the module doc for what an engine cannot do).

        Returns float32 numpy ``[n, dim]`` in input order (``[dim]`` for one string), one stacked CPU tensor with
        ``convert_to_tensor``, a list of CPU tensors with ``convert_to_numpy=False``. ``device`` moves the engine
        there for this and later calls, as 1.0.1 moves its model.
        """
        if output_value in ("token_embeddings", None):
            raise ValueError(f"output_value={output_value!r}: {TOKEN_OUTPUT_HINT}")
        if output_value != "sentence_embedding":
            raise ValueError(f"output_value must be 'sentence_embedding', 'token_embeddings' or None, got {output_value!r}")
        if device is not None:
            self.to(device)
        out = self.encoder.encode(
            sentences, batch_size=batch_size, show_progress_bar=bool(show_progress_bar), normalize_embeddings=normalize_embeddings
        )
        if convert_to_numpy and not convert_to_tensor:
            return out
        tensor = _torch("convert_to_tensor=True" if convert_to_tensor else "convert_to_numpy=False").from_numpy(out)
        return tensor if convert_to_tensor or isinstance(sentences, str) else list(tensor)

    def close(self) -> None:
        """Release the engine."""
        self.encoder.close()

    def __enter__(self) -> "INSTRUCTOR":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
