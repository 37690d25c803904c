"""``python -m bench.speed.serve_naive``: the server a user would otherwise write, the baseline of ``bench.speed.serve``.

FastAPI plus the PyTorch reference model (``trainer.InstructorModel``, = InstructorEmbedding 1.0.1), each request
encoded on its own in FastAPI's thread pool (a plain ``def`` endpoint, as FastAPI's docs advise for blocking
code): no batching across requests, no tokenizing off the request path. Same request and response shape as
``POST /v1/embeddings`` with ``encoding_format: "float"``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Union

from fastapi import FastAPI
from pydantic import BaseModel


class EmbeddingRequest(BaseModel):
    input: Union[str, list[Any]]
    model: str = ""
    encoding_format: str = "float"


def create_app(checkpoint: Path, batch_size: int = 32) -> FastAPI:
    from trainer.model import InstructorModel

    model = InstructorModel.from_pretrained(checkpoint)
    model.encode(["warm up"])
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    def embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        items = [req.input] if isinstance(req.input, str) else req.input
        vectors = model.encode(items, batch_size=batch_size)
        data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": req.model}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.speed.serve_naive", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="sentence-transformers folder of the model")
    p.add_argument("--host", default="127.0.0.1", help="Default: 127.0.0.1")
    p.add_argument("--port", type=int, default=8081, help="Default: 8081")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default). Default: 0")
    args = p.parse_args(argv)
    import torch
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(create_app(args.checkpoint), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
