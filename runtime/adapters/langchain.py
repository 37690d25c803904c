"""LangChain: ``HuggingFaceInstructEmbeddings`` on an engine file or a server, without torch or InstructorEmbedding.

Replaces ``langchain_community.embeddings.HuggingFaceInstructEmbeddings`` (same fields and methods; a LangChain
``Embeddings``): ``embed_documents`` embeds ``[embed_instruction, text]``, ``embed_query`` ``[query_instruction,
text]``, with upstream's defaults. ``model_kwargs`` go to the engine (``device``, ``intra_op_threads`` ...),
``encode_kwargs`` to every ``encode`` (``normalize_embeddings``, ``batch_size``). New: ``url``/``api_key``/
``timeout`` for a ``runtime.serve`` server instead of ``model_name``, ``client`` for an engine already open, and the
async pair that does not block the event loop.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from runtime.deps import require

require("langchain_core", "langchain", "runtime.adapters.langchain")

from langchain_core.embeddings import Embeddings  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr  # noqa: E402

from runtime.adapters.embedder import Embedder  # noqa: E402

DEFAULT_EMBED_INSTRUCTION = "Represent the document for retrieval: "  # HuggingFaceInstructEmbeddings' defaults
DEFAULT_QUERY_INSTRUCTION = "Represent the question for retrieving supporting documents: "


class HuggingFaceInstructEmbeddings(BaseModel, Embeddings):
    """``HuggingFaceInstructEmbeddings(model_name="instructor-large.onnx")`` or ``(url="http://127.0.0.1:8080")``."""

    client: Any = None
    """An open ``runtime.Encoder``, ``runtime.INSTRUCTOR`` or ``runtime.client.Client``; else opened from model_name or url."""
    model_name: Optional[str] = None
    """The exported engine file (``.onnx``, ``.plan``, ``.pt2``); a hub name is refused with the export command."""
    cache_folder: Optional[str] = None
    """Accepted for compatibility; nothing is downloaded."""
    model_kwargs: Dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the engine: ``device``, ``intra_op_threads``, ``max_tokens`` ..."""
    encode_kwargs: Dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for every ``encode`` call: ``normalize_embeddings``, ``batch_size``."""
    embed_instruction: str = DEFAULT_EMBED_INSTRUCTION
    query_instruction: str = DEFAULT_QUERY_INSTRUCTION
    show_progress: bool = False
    url: Optional[str] = None
    """A ``runtime.serve`` server to use instead of a local engine."""
    api_key: Optional[SecretStr] = None
    """The server's ``--api-key`` (default: ``$INSTRUCTOR_API_KEY``)."""
    timeout: Optional[float] = None
    """Seconds per request to the server (default: the client's, 60)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True)
    _embedder: Embedder = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options = dict(self.model_kwargs)
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        self._embedder = Embedder(self.model_name, url=self.url, api_key=key, timeout=self.timeout,
                                  device=options.pop("device", None), encoder=self.client, **options)
        self.client = self._embedder.encoder

    def _options(self) -> Dict[str, Any]:
        options = dict(self.encode_kwargs)
        options.setdefault("show_progress_bar", self.show_progress)
        return options

    def embed_documents(self, texts: List[str]) -> List[List[float]]:
        """Vectors of ``[embed_instruction, text]`` for each text."""
        return self._embedder.encode([[self.embed_instruction, t] for t in texts], **self._options()).tolist()

    def embed_query(self, text: str) -> List[float]:
        """The vector of ``[query_instruction, text]``."""
        return self._embedder.encode([[self.query_instruction, text]], **self._options())[0].tolist()

    async def aembed_documents(self, texts: List[str]) -> List[List[float]]:
        """``embed_documents`` without blocking the event loop."""
        return (await self._embedder.aencode([[self.embed_instruction, t] for t in texts], **self._options())).tolist()

    async def aembed_query(self, text: str) -> List[float]:
        """``embed_query`` without blocking the event loop."""
        return (await self._embedder.aencode([[self.query_instruction, text]], **self._options()))[0].tolist()
