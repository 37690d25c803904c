"""The PyTorch INSTRUCTOR model: encoder -> instruction-masked mean (fp32 sums) -> Dense -> L2 normalize.

It is the training model and the export source; on the same weights it gives the vectors of
``InstructorEmbedding==1.0.1`` (and of sentence-transformers for BERT-family folders such as all-MiniLM-L6-v2).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from runtime.tokenization import InstructionTokenizer
from trainer.checkpoint import (
    DENSE_ACTIVATIONS,
    SUPPORTED_ARCHITECTURES,
    TOKENIZER_FILES,
    CheckpointError,
    read_json,
    read_layout,
    write_json,
)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor, instruction_count: torch.Tensor) -> torch.Tensor:
    """Mean of the token states at positions ``t >= instruction_count`` that are not padding; sums in fp32."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    keep = attention_mask.to(torch.bool) & (positions[None, :] >= instruction_count[:, None])
    weights = keep.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1e-9)


OUTPUT_VALUES = ("sentence_embedding", "token_embeddings", None)


class DeviceError(RuntimeError):
    """A device torch cannot use here (no CUDA GPU, a GPU index past the last one): says what to use instead."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` this machine has (default: CUDA when torch sees a GPU, else the CPU).

    Checked before the model moves: without it, ``'cuda'`` on a CPU-only torch fails deep in torch with a bare
    ``AssertionError: Torch not compiled with CUDA enabled``.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"device={device!r}: not a device name torch knows; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceError(
                f"device={device!r}: torch sees no CUDA GPU (torch {torch.__version__}, {build}); use device='cpu', "
                "or for speed on the CPU an exported engine: `python -m export FOLDER --out model.onnx`, then "
                "`runtime.INSTRUCTOR('model.onnx')`"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device={device!r}: torch sees {torch.cuda.device_count()} GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device={device!r}: the MPS backend is not available here; use device='cpu'")
    return dev


def _all_outputs(
    feats: dict[str, torch.Tensor], hidden: torch.Tensor, emb: torch.Tensor, row: int, length: int, count: int
) -> dict[str, torch.Tensor]:
    """``output_value=None``: 1.0.1's features of one input, cut at its own length (1.0.1 keeps its batch's padding).

    ``attention_mask`` has the instruction's positions zeroed and ``context_masks`` is their count, as 1.0.1's
    Transformer module leaves them; ``sentence_embedding`` is the model's output, never re-normalized.
    """
    mask = feats["attention_mask"][row, :length].clone()
    mask[:count] = 0
    return {
        "input_ids": feats["input_ids"][row, :length],
        "attention_mask": mask,
        "context_masks": feats["instruction_count"][row],
        "token_embeddings": hidden[row, :length],
        "sentence_embedding": emb[row],
    }


def _load_encoder(folder: Path) -> nn.Module:
    from transformers import AutoModel, T5EncoderModel
    from transformers.utils import logging as hf_logging

    cfg = read_json(folder / "config.json")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{folder / 'config.json'}: unsupported architecture model_type={model_type!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if not any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise CheckpointError(f"{folder}: no encoder weights (expected model.safetensors or pytorch_model.bin)")
    cls = T5EncoderModel if model_type in ("t5", "mt5") else AutoModel
    hf_logging.disable_progress_bar()
    try:
        encoder, info = cls.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, dtype=torch.float32
        )
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot load the {model_type} encoder weights ({exc})") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CheckpointError(f"{folder}: encoder weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    return encoder


class InstructorModel(nn.Module):
    """A sentence-transformers folder as one module; ``forward`` takes the tokenizer's three int64 arrays."""

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: InstructionTokenizer,
        dense: nn.Linear | None = None,
        dense_activation: str = "torch.nn.modules.linear.Identity",
        normalize: bool = True,
        source_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self.auto_model = encoder
        self.tokenizer = tokenizer
        self.dense = dense
        self.dense_activation_name = dense_activation
        self.dense_activation = DENSE_ACTIVATIONS[dense_activation]()
        self.normalize = normalize
        self.source_dir = source_dir

    @property
    def max_seq_length(self) -> int:
        return self.tokenizer.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        """``model.max_seq_length = n`` as in InstructorEmbedding: texts are cut at ``n`` tokens from the next call on."""
        limit = getattr(self.auto_model.config, "max_position_embeddings", None)  # T5: none (relative positions)
        if limit is not None and isinstance(value, int) and value > limit:
            raise ValueError(f"max_seq_length={value}: this {self.architecture} encoder has {limit} positions")
        self.tokenizer = self.tokenizer.with_max_seq_length(value)

    @property
    def hidden_size(self) -> int:
        cfg = self.auto_model.config
        return int(cfg.hidden_size)  # T5Config maps hidden_size to d_model

    @property
    def embedding_dim(self) -> int:
        return self.dense.out_features if self.dense is not None else self.hidden_size

    @property
    def architecture(self) -> str:
        return str(self.auto_model.config.model_type)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "InstructorModel":
        """Load a sentence-transformers folder (hkunlp layout, upstream-trainer layout, or BERT-family)."""
        layout = read_layout(folder)
        encoder = _load_encoder(layout.transformer_dir)
        hidden = int(encoder.config.hidden_size)
        tokenizer = InstructionTokenizer(
            layout.transformer_dir / "tokenizer.json", layout.max_seq_length, layout.do_lower_case
        )
        dense = None
        activation = "torch.nn.modules.linear.Identity"
        if layout.dense is not None:
            spec = layout.dense
            if spec.in_features != hidden:
                raise CheckpointError(
                    f"{layout.root}: Dense in_features={spec.in_features} does not match the encoder's hidden size {hidden}"
                )
            dense = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
            dense.load_state_dict({k.removeprefix("linear."): v.float() for k, v in spec.state.items()})
            activation = spec.activation
        model = cls(encoder, tokenizer, dense, activation, layout.normalize, source_dir=layout.root)
        return model.eval()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, instruction_count: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.auto_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden, attention_mask, instruction_count)

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor, instruction_count: torch.Tensor) -> torch.Tensor:
        """Pooling, Dense and normalization on the encoder's last hidden state."""
        pooled = masked_mean(hidden, attention_mask, instruction_count)
        if self.dense is not None:
            weight = self.dense.weight  # a method, not a tensor, once torch.quantization.quantize_dynamic has run
            dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
            pooled = self.dense_activation(self.dense(pooled.to(dtype))).to(torch.float32)
        if self.normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        return pooled

    def features(self, inputs: Sequence[Any], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Tokenize inputs into the tensors ``forward`` takes."""
        arrays = self.tokenizer(inputs)
        return {k: torch.from_numpy(v).to(device or self._device) for k, v in arrays.items()}

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()  # as 1.0.1: the tensors it returns are ordinary ones, usable in autograd later
    def encode(
        self,
        sentences: str | Sequence[Any],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: str | None = "sentence_embedding",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | None = None,
        normalize_embeddings: bool = False,
    ) -> Any:
        """``INSTRUCTOR.encode`` of InstructorEmbedding 1.0.1, argument for argument; input order kept.

        Inputs: strings, ``[instruction, text]`` and ``[instruction, text, k]`` in any mix. ``output_value``:
        ``'sentence_embedding'``; ``'token_embeddings'`` (per input, the encoder's states of every token up to its
        last pooled one, instruction included, as 1.0.1 slices them); ``None`` (per input a dict, see
        ``_all_outputs``). Sentence embeddings come as numpy ``[n, dim]``, one stacked tensor
        (``convert_to_tensor``) or a list of tensors (``convert_to_numpy=False``); the other outputs always as a
        list of tensors, on the model's device like 1.0.1's. ``device`` moves the model there (and it stays).
        ``normalize_embeddings`` L2-normalizes sentence embeddings (they already are when the checkpoint lists a
        Normalize module).
        """
        if output_value not in OUTPUT_VALUES:
            raise ValueError(f"output_value must be one of {', '.join(map(repr, OUTPUT_VALUES))}, got {output_value!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        single = isinstance(sentences, str)
        items = [sentences] if single else list(sentences)
        if device is not None:
            self.to(resolve_device(device))
        self.eval()
        encoded = self.tokenizer.encode(items)
        order = np.argsort(-encoded.lengths, kind="stable")
        results: list[Any] = [None] * len(items)
        starts = range(0, len(items), batch_size)
        for start in tqdm(starts, desc="Batches", disable=not show_progress_bar):
            rows = order[start : start + batch_size]
            feats = {k: torch.from_numpy(v).to(self._device) for k, v in self.tokenizer.pad(encoded.take(rows)).items()}
            hidden = self.auto_model(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"]).last_hidden_state
            emb = self.head(hidden, feats["attention_mask"], feats["instruction_count"])
            if normalize_embeddings and output_value == "sentence_embedding":
                emb = F.normalize(emb, p=2, dim=1)
            for j, i in enumerate(rows.tolist()):
                length, count = len(encoded.ids[i]), int(encoded.instruction_count[i])
                if output_value == "sentence_embedding":
                    results[i] = emb[j] if convert_to_tensor or not convert_to_numpy else emb[j].cpu()
                elif output_value == "token_embeddings":
                    results[i] = hidden[j, : length if count < length else 1]  # 1.0.1: up to the last unmasked token
                else:
                    results[i] = _all_outputs(feats, hidden, emb, j, length, count)
        if output_value != "sentence_embedding" or not (convert_to_tensor or convert_to_numpy):
            return results[0] if single else results
        if convert_to_tensor:
            out: Any = torch.stack(results) if results else torch.empty(0, self.embedding_dim)
        else:
            out = np.stack([r.numpy() for r in results]) if results else np.zeros((0, self.embedding_dim), np.float32)
        return out[0] if single else out

    def save(self, folder: str | Path, safe_serialization: bool = True) -> None:
        """Write the hkunlp layout: root encoder + tokenizer, ``1_Pooling``, ``2_Dense``, ``3_Normalize``."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        if safe_serialization:
            self.auto_model.save_pretrained(str(out))
        else:  # transformers 5 always writes safetensors from save_pretrained; the .bin layout is written here
            self.auto_model.config.save_pretrained(str(out))
            state = {k: v.detach().contiguous().cpu() for k, v in self.auto_model.state_dict().items()}
            torch.save(state, out / "pytorch_model.bin")
            (out / "model.safetensors").unlink(missing_ok=True)
        src = self.tokenizer.path.parent
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and (src / name).resolve() != (out / name).resolve():
                shutil.copyfile(src / name, out / name)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
        write_json(out / "sentence_bert_config.json", {"max_seq_length": self.max_seq_length, "do_lower_case": self.tokenizer.do_lower_case})
        write_json(out / "config_sentence_transformers.json", {"__version__": {"sentence_transformers": "2.2.2", "pytorch": torch.__version__}})
        pool_dir = out / "1_Pooling"
        pool_dir.mkdir(exist_ok=True)
        write_json(
            pool_dir / "config.json",
            {
                "word_embedding_dimension": self.hidden_size,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
        )
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        if self.dense is not None:
            self._save_dense(out / "2_Dense", safe_serialization)
            modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        if self.normalize:
            idx = len(modules)
            path = f"{idx}_Normalize"
            (out / path).mkdir(exist_ok=True)
            modules.append({"idx": idx, "name": str(idx), "path": path, "type": "sentence_transformers.models.Normalize"})
        write_json(out / "modules.json", modules)

    def _save_dense(self, folder: Path, safe_serialization: bool) -> None:
        # sentence-transformers 2.2.2 (what InstructorEmbedding 1.0.1 runs on) reads only pytorch_model.bin here.
        folder.mkdir(parents=True, exist_ok=True)
        state = {f"linear.{k}": v.detach().to(torch.float32).contiguous().cpu() for k, v in self.dense.state_dict().items()}
        write_json(
            folder / "config.json",
            {
                "in_features": self.dense.in_features,
                "out_features": self.dense.out_features,
                "bias": self.dense.bias is not None,
                "activation_function": self.dense_activation_name,
            },
        )
        torch.save(state, folder / "pytorch_model.bin")
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(state, str(folder / "model.safetensors"))
        elif (folder / "model.safetensors").exists():
            (folder / "model.safetensors").unlink()

