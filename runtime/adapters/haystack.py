"""Haystack: ``InstructorTextEmbedder`` and ``InstructorDocumentEmbedder`` on an engine file or a server.

Replace the components of ``instructor-embedders-haystack`` (same arguments, ``warm_up``, ``run``, ``to_dict`` /
``from_dict``), without torch or InstructorEmbedding. The text embedder embeds ``[instruction, text]``; the document
embedder ``[instruction, meta values + content]`` joined by ``embedding_separator`` (``meta_fields_to_embed``), as
upstream does, and returns new ``Document`` objects with their ``embedding`` (Haystack warns on changing one in
place). ``model`` is the exported engine file; ``device`` a string or Haystack ``ComponentDevice``; ``token`` is
accepted and unused (nothing is downloaded). New: ``url``/``api_key``/``timeout`` for a ``runtime.serve`` server,
``encoder`` to share one open engine between the two components (not serialized), ``run_async``, and ``run``
warming up by itself.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional

from runtime.deps import require

require("haystack", "haystack", "runtime.adapters.haystack")

from haystack import Document, component, default_from_dict, default_to_dict  # noqa: E402
from haystack.utils import Secret, deserialize_secrets_inplace  # noqa: E402

from runtime.adapters.embedder import Embedder  # noqa: E402

API_KEY_ENV = "INSTRUCTOR_API_KEY"  # the variable runtime.serve reads its --api-key from


def _device(device: Any) -> Optional[str]:
    """A device string for the engine: a Haystack ``ComponentDevice`` or a string (``cpu``, ``cuda:0``), or None."""
    if device is None or isinstance(device, str):
        return device
    if hasattr(device, "to_torch_str"):
        return device.to_torch_str()
    raise TypeError(f"device must be a string or a haystack ComponentDevice, got {type(device).__name__}")


class _Embedding:
    """What the two components share: the arguments that say where vectors come from, and warming up."""

    def _init_source(self, model: Optional[str], device: Any, url: Optional[str], api_key: Optional[Secret],
                     timeout: Optional[float], encoder: Any) -> None:
        self.model = model
        self.device = _device(device)
        self.url = url
        self.api_key = api_key
        self.timeout = timeout
        self._encoder = encoder
        self._embedder: Optional[Embedder] = None

    def warm_up(self) -> None:
        """Open the engine (or the server's client) once."""
        if self._embedder is None:
            key = self.api_key.resolve_value() if self.api_key is not None else None
            self._embedder = Embedder(self.model, url=self.url, api_key=key, timeout=self.timeout, device=self.device,
                                      encoder=self._encoder)

    def _ready(self) -> Embedder:
        self.warm_up()
        assert self._embedder is not None
        return self._embedder

    def _options(self) -> Dict[str, Any]:
        return {"batch_size": self.batch_size, "normalize_embeddings": self.normalize_embeddings,  # type: ignore[attr-defined]
                "show_progress_bar": self.progress_bar}  # type: ignore[attr-defined]

    def _source_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "device": self.device, "url": self.url, "timeout": self.timeout,
                "api_key": self.api_key.to_dict() if self.api_key is not None else None}


@component
class InstructorTextEmbedder(_Embedding):
    """Embeds one string (a query): ``{"embedding": [...]}``."""

    def __init__(
        self,
        model: Optional[str] = None,
        device: Any = None,
        token: Any = None,
        instruction: str = "Represent the sentence",
        batch_size: int = 32,
        progress_bar: bool = True,
        normalize_embeddings: bool = False,
        *,
        url: Optional[str] = None,
        api_key: Optional[Secret] = Secret.from_env_var(API_KEY_ENV, strict=False),  # noqa: B008
        timeout: Optional[float] = None,
        encoder: Any = None,
    ) -> None:
        self._init_source(model, device, url, api_key, timeout, encoder)
        self.instruction = instruction
        self.batch_size = batch_size
        self.progress_bar = progress_bar
        self.normalize_embeddings = normalize_embeddings

    def to_dict(self) -> Dict[str, Any]:
        return default_to_dict(self, **self._source_dict(), instruction=self.instruction, batch_size=self.batch_size,
                               progress_bar=self.progress_bar, normalize_embeddings=self.normalize_embeddings)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "InstructorTextEmbedder":
        deserialize_secrets_inplace(data["init_parameters"], keys=["api_key"])
        return default_from_dict(cls, data)

    def _check(self, text: Any) -> List[List[str]]:
        if not isinstance(text, str):
            raise TypeError("InstructorTextEmbedder expects a string as input; to embed Documents use InstructorDocumentEmbedder")
        return [[self.instruction, text]]

    @component.output_types(embedding=List[float])
    def run(self, text: str) -> Dict[str, Any]:
        """The vector of ``[instruction, text]``."""
        return {"embedding": self._ready().encode(self._check(text), **self._options())[0].tolist()}

    @component.output_types(embedding=List[float])
    async def run_async(self, text: str) -> Dict[str, Any]:
        """``run`` without blocking the event loop."""
        return {"embedding": (await self._ready().aencode(self._check(text), **self._options()))[0].tolist()}


@component
class InstructorDocumentEmbedder(_Embedding):
    """Embeds Documents: ``{"documents": [...]}``, each with its ``embedding``."""

    def __init__(
        self,
        model: Optional[str] = None,
        device: Any = None,
        token: Any = None,
        instruction: str = "Represent the document",
        batch_size: int = 32,
        progress_bar: bool = True,
        normalize_embeddings: bool = False,
        meta_fields_to_embed: Optional[List[str]] = None,
        embedding_separator: str = "\n",
        *,
        url: Optional[str] = None,
        api_key: Optional[Secret] = Secret.from_env_var(API_KEY_ENV, strict=False),  # noqa: B008
        timeout: Optional[float] = None,
        encoder: Any = None,
    ) -> None:
        self._init_source(model, device, url, api_key, timeout, encoder)
        self.instruction = instruction
        self.batch_size = batch_size
        self.progress_bar = progress_bar
        self.normalize_embeddings = normalize_embeddings
        self.meta_fields_to_embed = meta_fields_to_embed or []
        self.embedding_separator = embedding_separator

    def to_dict(self) -> Dict[str, Any]:
        return default_to_dict(self, **self._source_dict(), instruction=self.instruction, batch_size=self.batch_size,
                               progress_bar=self.progress_bar, normalize_embeddings=self.normalize_embeddings,
                               meta_fields_to_embed=self.meta_fields_to_embed, embedding_separator=self.embedding_separator)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "InstructorDocumentEmbedder":
        deserialize_secrets_inplace(data["init_parameters"], keys=["api_key"])
        return default_from_dict(cls, data)

    def _pairs(self, documents: Any) -> List[List[str]]:
        if not isinstance(documents, list) or (documents and not isinstance(documents[0], Document)):
            raise TypeError("InstructorDocumentEmbedder expects a list of Documents as input; to embed a string use InstructorTextEmbedder")
        pairs = []
        for doc in documents:
            meta = [str(doc.meta[k]) for k in self.meta_fields_to_embed if k in doc.meta and doc.meta[k] is not None]
            pairs.append([self.instruction, self.embedding_separator.join([*meta, doc.content or ""])])
        return pairs

    @component.output_types(documents=List[Document])
    def run(self, documents: List[Document]) -> Dict[str, Any]:
        """The documents, each a copy with its ``embedding``."""
        vectors = self._ready().encode(self._pairs(documents), **self._options())
        return {"documents": [replace(d, embedding=v.tolist()) for d, v in zip(documents, vectors)]}

    @component.output_types(documents=List[Document])
    async def run_async(self, documents: List[Document]) -> Dict[str, Any]:
        """``run`` without blocking the event loop."""
        vectors = await self._ready().aencode(self._pairs(documents), **self._options())
        return {"documents": [replace(d, embedding=v.tolist()) for d, v in zip(documents, vectors)]}
