"""``trainer.INSTRUCTOR``: InstructorEmbedding 1.0.1's ``INSTRUCTOR`` class on the PyTorch model.

The reference path for code written against the original: the same constructor (a folder, or a hub name found
in the caches the original downloaded into: ``trainer.model_source``), the same ``encode`` (every argument and
output of 1.0.1, token embeddings included: ``InstructorModel.encode``), a settable ``max_seq_length``, and
``torch.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)`` as the original's README
shows. Methods of the original that this project offers another way (``fit``, ``encode_multi_process`` ...)
raise an error naming that way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from runtime.instructor import elsewhere_error
from trainer.model import InstructorModel, resolve_device
from trainer.model_source import local_model_folder


class INSTRUCTOR(InstructorModel):
    """``INSTRUCTOR(model_name_or_path, device=None, cache_folder=None)``, as in InstructorEmbedding 1.0.1.

    ``model_name_or_path``: a sentence-transformers folder, or a hub name already on disk in ``cache_folder`` or
    the default caches (nothing is downloaded); an engine file (``.onnx`` ...) is refused with ``runtime.INSTRUCTOR``,
    which runs it. ``device``: where the model runs; by default CUDA when torch sees a GPU, else the CPU, as 1.0.1;
    one this machine lacks raises ``DeviceError`` saying so.
    """

    def __init__(
        self, model_name_or_path: str | Path, device: str | None = None, cache_folder: str | Path | None = None
    ) -> None:
        target = resolve_device(device)  # before the weights load: a device this machine lacks fails at once, clearly
        loaded = InstructorModel.from_pretrained(local_model_folder(model_name_or_path, cache_folder))
        super().__init__(
            loaded.auto_model, loaded.tokenizer, loaded.dense, loaded.dense_activation_name, loaded.normalize, loaded.source_dir
        )
        self.eval()
        self.to(target)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "INSTRUCTOR":
        """The same as ``INSTRUCTOR(folder)``."""
        return cls(folder)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            error = elsewhere_error("trainer.INSTRUCTOR", name)
            if error is None:
                raise
            raise error from None

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return self._device

    def get_max_seq_length(self) -> int:
        """``max_seq_length``, as sentence-transformers names it."""
        return self.max_seq_length

    def get_sentence_embedding_dimension(self) -> int:
        """The length of one embedding."""
        return self.embedding_dim

    def tokenize(self, texts: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The padded tensors ``forward`` takes (1.0.1 calls the instruction counts ``context_masks``)."""
        return self.features(texts)
