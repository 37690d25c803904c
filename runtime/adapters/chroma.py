"""Chroma: ``InstructorEmbeddingFunction`` on an engine file or a server, without torch or InstructorEmbedding.

Replaces ``chromadb.utils.embedding_functions.InstructorEmbeddingFunction`` (same arguments; a Chroma
``EmbeddingFunction``): ``__call__(input)`` embeds ``[instruction, text]`` for each text, or the plain text when
``instruction`` is None (pooled over all its tokens, as upstream). New: ``query_instruction`` for what Chroma embeds
through ``embed_query`` (the query texts of ``collection.query``; default: ``instruction``, upstream's behaviour),
``url``/``api_key``/``timeout`` for a ``runtime.serve`` server instead of ``model_name``, and ``encoder`` for an
engine already open. Registered under the name ``instructor_stack``, so a persisted collection finds it again
(the API key is never stored in its configuration: the client reads ``$INSTRUCTOR_API_KEY``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from runtime.deps import require

require("chromadb", "chroma", "runtime.adapters.chroma")

from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space  # noqa: E402
from chromadb.utils.embedding_functions import register_embedding_function  # noqa: E402

from runtime.adapters.embedder import Embedder  # noqa: E402


@register_embedding_function
class InstructorEmbeddingFunction(EmbeddingFunction[Documents]):
    """``InstructorEmbeddingFunction(model_name="instructor-large.onnx", instruction=...)`` or ``(url=...)``."""

    def __init__(
        self,
        model_name: Optional[str] = None,
        device: Optional[str] = "cpu",
        instruction: Optional[str] = None,
        *,
        query_instruction: Optional[str] = None,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: Optional[float] = None,
        encoder: Any = None,
    ) -> None:
        self._embedder = Embedder(model_name, url=url, api_key=api_key, timeout=timeout,
                                  device=device if model_name is not None else None, encoder=encoder)
        engine, server = self._embedder.source
        self.model_name = model_name if model_name is not None else engine
        self.url = url if url is not None else server
        self.device = device
        self.instruction = instruction
        self.query_instruction = query_instruction
        self.timeout = timeout

    def _embed(self, texts: Documents, instruction: Optional[str]) -> Embeddings:
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("InstructorEmbeddingFunction embeds text documents only")
        items = list(texts) if instruction is None else [[instruction, t] for t in texts]
        return list(self._embedder.encode(items).astype(np.float32, copy=False))

    def __call__(self, input: Documents) -> Embeddings:  # noqa: A002 (Chroma's protocol names it input)
        """One float32 vector per text, with ``instruction``."""
        return self._embed(input, self.instruction)

    def embed_query(self, input: Documents) -> Embeddings:  # noqa: A002
        """Query vectors: with ``query_instruction`` when given, else as ``__call__``."""
        return self._embed(input, self.instruction if self.query_instruction is None else self.query_instruction)

    @staticmethod
    def name() -> str:
        return "instructor_stack"

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> List[Space]:
        return ["cosine", "l2", "ip"]

    @staticmethod
    def build_from_config(config: Dict[str, Any]) -> "InstructorEmbeddingFunction":
        return InstructorEmbeddingFunction(**config)

    def get_config(self) -> Dict[str, Any]:
        """What ``build_from_config`` opens again: the engine file or the server (an ``encoder=`` passed in is
        recorded as the file or URL it came from), never the API key."""
        source = {"url": self.url, "timeout": self.timeout} if self.url is not None else {"model_name": self.model_name, "device": self.device}
        return {**source, "instruction": self.instruction, "query_instruction": self.query_instruction}

    def is_legacy(self) -> bool:
        """Not legacy: the whole protocol is here. (The base class decides by building a second copy from
        ``get_config``, which would open a second engine.)"""
        return False
