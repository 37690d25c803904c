"""``python -m runtime.serve``: an HTTP embedding server for engine bundles, with per-item instructions.

The pieces, each in its own module: ``config`` (limits and named instructions), ``requests`` (request bodies to
``INSTRUCTOR.encode`` inputs, with errors naming the item), ``batcher`` (one inference thread that batches the
items of every waiting request with the runtime's token-budget planner), ``output`` (vectors to JSON),
``metrics`` (Prometheus), ``middleware`` (API key and request counting), ``errors`` (OpenAI-style error bodies),
``app`` (the Starlette routes) and ``__main__`` (the command line on uvicorn). Nothing here imports torch.
Install with ``pip install 'instructor-stack[serve]'``.
"""
