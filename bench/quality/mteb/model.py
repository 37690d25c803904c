"""An engine (or checkpoint) as an mteb 2.x encoder, with INSTRUCTOR's per-task instructions.

mteb 2.x hands ``encode`` a DataLoader of batches (``batch["text"]``; retrieval documents already joined as
``(title + " " + text).strip()``), the task's metadata and a prompt type (query / document). The wrapper
looks the task up in one instruction table of ``bench/quality/mteb_instructions.json`` and encodes ``[instruction, text]``
pairs exactly as ``INSTRUCTOR.encode`` would; with no table (``none``) it encodes the plain strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from bench.quality.encoders import NO_INSTRUCTIONS, SentenceEncoder
from bench.quality.mteb.tables import INSTRUCTIONS_FILE, instruction_tables  # noqa: F401 (re-exported)


class Instructions:
    """One model's instruction table: task name -> instruction, or ``{query, corpus}`` for retrieval/reranking."""

    def __init__(self, table_name: str, path: Path = INSTRUCTIONS_FILE) -> None:
        self.table_name = table_name
        self.by_task: dict[str, str | dict[str, str]] = {}
        if table_name == NO_INSTRUCTIONS:
            return
        tables = instruction_tables(path)
        if table_name not in tables:
            raise ValueError(f"{path}: no instruction table {table_name!r} (have: {', '.join(sorted(tables))}, or 'none')")
        for group in tables[table_name].values():
            self.by_task.update(group)

    def has(self, task_name: str) -> bool:
        return self.table_name == NO_INSTRUCTIONS or task_name in self.by_task

    def lookup(self, task_name: str, prompt_type: PromptType | None) -> str | None:
        """The instruction for this task and side; ``None`` means encode the plain text."""
        entry = self.by_task.get(task_name)
        if entry is None or isinstance(entry, str):
            return entry
        side = "query" if prompt_type in (None, PromptType.query) else "corpus"
        return entry[side]


class InstructorMTEBModel(AbsEncoder):
    """mteb's ``EncoderProtocol`` over any ``INSTRUCTOR.encode``-style encoder."""

    def __init__(
        self,
        encoder: SentenceEncoder,
        instructions: Instructions,
        name: str,
        embedding_dim: int | None = None,
        batch_size: int = 32,
        framework: str = "ONNX",
    ) -> None:
        self.encoder = encoder
        self.instructions = instructions
        self.batch_size = batch_size
        self.mteb_model_meta = ModelMeta.create_empty().model_copy(
            update={
                "name": name,
                "revision": "local",
                "embed_dim": embedding_dim,
                "framework": [framework],
                "similarity_fn_name": ScoringFunction.COSINE,
                "use_instructions": instructions.table_name != NO_INSTRUCTIONS,
            }
        )
        self.used: dict[str, dict[str, str | None]] = {}

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        instruction = self.instructions.lookup(task_metadata.name, prompt_type)
        side = prompt_type.value if prompt_type is not None else "text"
        self.used.setdefault(task_metadata.name, {})[side] = instruction
        items = texts if instruction is None else [[instruction, t] for t in texts]
        show = kwargs.get("show_progress_bar", False)
        out = self.encoder.encode(items, batch_size=self.batch_size, show_progress_bar=show, convert_to_numpy=True)
        return np.asarray(out, dtype=np.float32)
