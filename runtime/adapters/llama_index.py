"""LlamaIndex: ``InstructorEmbedding`` on an engine file or a server, without torch or InstructorEmbedding.

Replaces ``llama_index.embeddings.instructor.InstructorEmbedding`` (a LlamaIndex ``BaseEmbedding``; same arguments).
Queries are embedded as ``[query_instruction, query]`` and texts as ``[text_instruction, text]``, each defaulting to
what upstream uses for INSTRUCTOR models. Upstream's query formatter reads ``text_instruction`` (so a query got the
document instruction whenever ``text_instruction`` was set, and ``query_instruction`` was never used); here each
instruction does what its name says. New: ``url``/``api_key``/``timeout`` for a ``runtime.serve`` server instead of
``model_name``, ``encoder`` for an engine already open, and async methods that do not block the event loop.
"""

from __future__ import annotations

from typing import Any, List, Optional

from runtime.deps import require

require("llama_index.core", "llama-index", "runtime.adapters.llama_index")

from llama_index.core.base.embeddings.base import DEFAULT_EMBED_BATCH_SIZE, BaseEmbedding  # noqa: E402
from llama_index.core.bridge.pydantic import Field, PrivateAttr  # noqa: E402
from llama_index.core.callbacks import CallbackManager  # noqa: E402

from runtime.adapters.embedder import Embedder  # noqa: E402

DEFAULT_QUERY_INSTRUCTION = "Represent the question for retrieving supporting documents: "  # llama_index's for INSTRUCTOR
DEFAULT_TEXT_INSTRUCTION = "Represent the document for retrieval: "


class InstructorEmbedding(BaseEmbedding):
    """``InstructorEmbedding(model_name="instructor-large.onnx")`` or ``(url="http://127.0.0.1:8080")``."""

    query_instruction: Optional[str] = Field(default=None, description="Instruction for queries (None: the INSTRUCTOR default).")
    text_instruction: Optional[str] = Field(default=None, description="Instruction for texts (None: the INSTRUCTOR default).")
    cache_folder: Optional[str] = Field(default=None, description="Accepted for compatibility; nothing is downloaded.")
    url: Optional[str] = Field(default=None, description="A runtime.serve server to use instead of a local engine.")
    timeout: Optional[float] = Field(default=None, description="Seconds per request to the server.")

    _embedder: Embedder = PrivateAttr()

    def __init__(
        self,
        model_name: Optional[str] = None,
        query_instruction: Optional[str] = None,
        text_instruction: Optional[str] = None,
        embed_batch_size: int = DEFAULT_EMBED_BATCH_SIZE,
        cache_folder: Optional[str] = None,
        device: Optional[str] = None,
        callback_manager: Optional[CallbackManager] = None,
        *,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: Optional[float] = None,
        encoder: Any = None,
        **engine_options: Any,
    ) -> None:
        embedder = Embedder(model_name, url=url, api_key=api_key, timeout=timeout, device=device, encoder=encoder,
                            **engine_options)
        super().__init__(
            embed_batch_size=embed_batch_size,
            callback_manager=callback_manager,
            model_name=str(model_name or url or type(embedder.encoder).__name__),
            query_instruction=query_instruction,
            text_instruction=text_instruction,
            cache_folder=cache_folder,
            url=url,
            timeout=timeout,
        )
        self._embedder = embedder

    @classmethod
    def class_name(cls) -> str:
        return "InstructorEmbedding"

    def _query_pair(self, query: str) -> List[str]:
        return [DEFAULT_QUERY_INSTRUCTION if self.query_instruction is None else self.query_instruction, query]

    def _text_pair(self, text: str) -> List[str]:
        return [DEFAULT_TEXT_INSTRUCTION if self.text_instruction is None else self.text_instruction, text]

    def _get_query_embedding(self, query: str) -> List[float]:
        return self._embedder.encode([self._query_pair(query)])[0].tolist()

    def _get_text_embedding(self, text: str) -> List[float]:
        return self._embedder.encode([self._text_pair(text)])[0].tolist()

    def _get_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return self._embedder.encode([self._text_pair(t) for t in texts]).tolist()

    async def _aget_query_embedding(self, query: str) -> List[float]:
        return (await self._embedder.aencode([self._query_pair(query)]))[0].tolist()

    async def _aget_text_embedding(self, text: str) -> List[float]:
        return (await self._embedder.aencode([self._text_pair(text)]))[0].tolist()

    async def _aget_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return (await self._embedder.aencode([self._text_pair(t) for t in texts])).tolist()
