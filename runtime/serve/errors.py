"""Every error the server sends, whatever raised it, as OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``.

OpenAI clients read these fields; the official ``openai`` client raises its exception class by status code and puts
the message in the exception text.
"""

from __future__ import annotations

import json
from http import HTTPStatus

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An error to send as it is: status, message, a short machine-readable code and optional headers."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_body(status: int, message: str, code: str, param: str | None = None) -> bytes:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:  # a message quoting invalid unicode (a lone surrogate): escape it instead
        return json.dumps(body, ensure_ascii=True).encode()


def error_response(status: int, message: str, code: str, param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status, message, code, param), status_code=status, media_type="application/json", headers=headers)


async def api_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)


async def http_error_handler(_request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404 unknown path, 405 wrong method, ...) in the same shape."""
    assert isinstance(exc, HTTPException)
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    return error_response(exc.status_code, str(exc.detail), code, headers=dict(exc.headers or {}))


async def server_error_handler(_request: Request, exc: Exception) -> Response:
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


EXCEPTION_HANDLERS = {ApiError: api_error_handler, HTTPException: http_error_handler, Exception: server_error_handler}
