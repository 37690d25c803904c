"""Where an adapter's vectors come from: a local engine file or a ``runtime.serve`` server, behind one interface.

Every adapter turns its framework's calls into ``INSTRUCTOR.encode`` inputs (``[instruction, text]`` pairs) and
hands them to an ``Embedder``. Local: ``runtime.INSTRUCTOR`` on the engine file (the upstream integrations wrap
InstructorEmbedding's ``INSTRUCTOR``; this is the same class on an engine). Remote: ``runtime.client``, whose
``encode`` has the same signature. An already open ``runtime.Encoder``, ``runtime.INSTRUCTOR`` or ``Client`` can be
passed instead (``encoder=``), so that several adapters share one engine, e.g. Haystack's text and document
embedders.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.client import DEFAULT_TIMEOUT, AsyncClient, Client
from runtime.tokenization import InputItem


class Embedder:
    """Vectors for ``INSTRUCTOR.encode`` inputs from exactly one of: ``model`` (an engine file: ``.onnx``, ``.plan``,
    ``.pt2``), ``url`` (a ``runtime.serve`` server, with ``api_key`` and ``timeout``), or ``encoder`` (an open object
    with ``encode``). ``device`` and ``engine_options`` (e.g. ``intra_op_threads``) go to the local engine."""

    def __init__(
        self,
        model: str | Path | None = None,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
        device: str | None = None,
        encoder: Any = None,
        **engine_options: Any,
    ) -> None:
        given = [name for name, value in (("model", model), ("url", url), ("encoder", encoder)) if value is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of: the model as an exported engine file (python -m export CHECKPOINT --out "
                "model.onnx), url= of a runtime.serve server, or encoder= (an open runtime.Encoder, runtime.INSTRUCTOR "
                f"or runtime.client.Client); got {', '.join(given) or 'none'}"
            )
        self._owned = encoder is None
        if encoder is not None:
            self.encoder = encoder
        elif url is not None:
            self.encoder = Client(url, api_key=api_key, timeout=DEFAULT_TIMEOUT if timeout is None else float(timeout))
        else:
            from runtime.instructor import INSTRUCTOR

            self.encoder = INSTRUCTOR(model, device=device, **engine_options)  # type: ignore[arg-type]

    @property
    def remote(self) -> bool:
        """Whether the vectors come from a server."""
        return isinstance(self.encoder, Client)

    @property
    def source(self) -> tuple[str | None, str | None]:
        """(engine file, server URL) the vectors come from, as far as the encoder tells: for configurations that
        must open the same embedder again (Chroma's persisted collections)."""
        if self.remote:
            return None, self.encoder.url
        engine = getattr(self.encoder, "encoder", self.encoder)  # runtime.INSTRUCTOR holds a runtime.Encoder
        manifest = getattr(engine, "manifest", None)
        return (str(manifest.engine) if manifest is not None else None), None

    def encode(self, items: Sequence[InputItem], batch_size: int | None = None, **options: Any) -> np.ndarray:
        """float32 ``[n, dim]`` for ``items``. ``batch_size`` is rows per engine batch locally; a server is sent
        the client's request size instead (the server batches rows itself). Other options: ``encode``'s."""
        if batch_size is not None and not self.remote:
            options["batch_size"] = batch_size
        return np.asarray(self.encoder.encode(list(items), **options), dtype=np.float32)

    async def aencode(self, items: Sequence[InputItem], batch_size: int | None = None, **options: Any) -> np.ndarray:
        """``encode`` without blocking the event loop: an ``AsyncClient`` for a server, a worker thread for a local
        engine (its work runs outside the GIL). The async client lives for this call only, so the adapter may be
        used from any event loop; it reuses the limits the blocking client has read."""
        if not self.remote:
            return await asyncio.to_thread(self.encode, items, batch_size, **options)
        sync = self.encoder
        async with AsyncClient(sync.url, api_key=sync.api_key, timeout=sync.timeout, max_retries=sync.max_retries,
                               backoff=sync.backoff, limits=sync.limits) as client:
            out = await client.encode(list(items), **options)
        sync.limits = sync.limits or client.limits
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        """Release the engine or connections this embedder opened (not an ``encoder=`` passed in)."""
        if self._owned:
            self.encoder.close()
