"""Request bodies into ``INSTRUCTOR.encode`` inputs, or an ``ApiError`` that names the field or the item.

Both endpoints take the inputs of ``INSTRUCTOR.encode``: a string, or a list whose items are each a string,
``[instruction, text]`` or ``[instruction, text, k]`` (``runtime.tokenization.parse_input`` checks each). A named or
given instruction turns every plain-string item into ``[instruction, text]``. Token-id inputs, which OpenAI also
accepts, are refused: the instruction rules need the text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from runtime.serve.errors import ApiError
from runtime.serve.output import EMBEDDING_TYPES, ENCODING_FORMATS
from runtime.tokenization import InputItem, has_lone_surrogate, parse_input


@dataclass
class EmbedRequest:
    """What one request asks for, validated."""

    items: list[InputItem]
    encoding_format: str = "float"
    embedding_type: str = "float"
    normalize: bool = True
    truncate: bool = True


def parse_json(body: bytes) -> Any:
    """The JSON document, under orjson's rules: numbers within a double (a 5000-digit integer is refused, not a
    500), nesting up to 1024 levels, no NaN. A string with a lone surrogate (``"\\ud800"``), which orjson refuses,
    is kept by the standard parser under the same rules, so that the item check can name its item."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "surrogate in string" not in exc.msg:
            why = f"nested too deeply (over {MAX_DEPTH} levels)" if "depth" in exc.msg else exc.msg
            raise ApiError(400, f"malformed JSON body: {why} (line {exc.lineno}, column {exc.colno})", "invalid_json") from exc
    if _depth(body) > MAX_DEPTH:
        raise ApiError(400, f"malformed JSON body: nested too deeply (over {MAX_DEPTH} levels)", "invalid_json")
    try:
        return json.loads(body, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ApiError(400, f"malformed JSON body: {getattr(exc, 'msg', exc)}{where}", "invalid_json") from exc
    except RecursionError as exc:
        raise ApiError(400, "malformed JSON body: nested too deeply", "invalid_json") from exc


MAX_DEPTH = 1024  # orjson's limit, held on the fallback path too
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_STEP = np.zeros(256, np.int32)
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1


def _depth(body: bytes) -> int:
    """The deepest nesting of ``body``'s arrays and objects, strings left out. The standard parser's own limit is
    the interpreter's recursion limit, which libraries raise (torch's compiler sets 2000), so it is no rule."""
    steps = _STEP[np.frombuffer(_STRING.sub(b"", body), np.uint8)]
    return int(np.cumsum(steps).max(initial=0))


def _json_int(digits: str) -> int | float:
    """An integer as orjson reads it: exact within 64 bits, else a double (never Python's 4,300-digit error)."""
    return int(digits) if len(digits) <= 20 and -(2**63) <= int(digits) < 2**64 else _json_float(digits)


def _json_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ApiError(400, f"malformed JSON body: number {_short(text)} is out of range (infinite as a double)", "invalid_json")
    return value


def _json_constant(name: str) -> float:
    raise ApiError(400, f"malformed JSON body: {name} is not a JSON value", "invalid_json")


def _short(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters, with the length it had, for a message."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _shown(value: Any) -> str:
    """A field's value for an error message: a string quoted and cut short, anything else by its kind (its repr
    could be megabytes, or too deeply nested to print)."""
    return repr(_short(value)) if isinstance(value, str) else _kind(value)


def parse_openai(data: Any, instructions: dict[str, str], dim: int, max_items: int) -> EmbedRequest:
    """``POST /v1/embeddings``: ``input``, ``model``, ``encoding_format``, ``embedding_type``, ``dimensions``,
    ``instruction``, ``instruction_name``."""
    body = _object(data)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"model must be a string, got {_kind(model)}", "invalid_type", "model")
    fmt = body.get("encoding_format") or "float"
    if not isinstance(fmt, str) or fmt not in ENCODING_FORMATS:
        raise ApiError(400, f"encoding_format must be 'float' or 'base64', got {_shown(fmt)}", "invalid_value", "encoding_format")
    _check_dimensions(body.get("dimensions"), dim)
    instruction = _instruction(body, "instruction", "instruction_name", instructions)
    items = _items(body, "input", instruction, max_items)
    return EmbedRequest(items=items, encoding_format=fmt, embedding_type=_embedding_type(body))


def parse_tei(data: Any, instructions: dict[str, str], dim: int, max_items: int) -> EmbedRequest:
    """``POST /embed`` (text-embeddings-inference's shape): ``inputs``, ``normalize``, ``truncate``, ``prompt_name``,
    and ``embedding_type``."""
    body = _object(data)
    normalize = _flag(body, "normalize", True)
    truncate = _flag(body, "truncate", True)
    direction = body.get("truncation_direction", "right")
    if not isinstance(direction, str) or direction.lower() != "right":
        raise ApiError(400, f"truncation_direction must be 'right' (as the reference truncates), got {_shown(direction)}", "invalid_value", "truncation_direction")
    _check_dimensions(body.get("dimensions"), dim)
    instruction = _instruction(body, None, "prompt_name", instructions)
    items = _items(body, "inputs", instruction, max_items)
    return EmbedRequest(items=items, embedding_type=_embedding_type(body), normalize=normalize, truncate=truncate)


def _embedding_type(body: dict[str, Any]) -> str:
    value = body.get("embedding_type") or "float"
    if not isinstance(value, str) or value not in EMBEDDING_TYPES:
        raise ApiError(400, f"embedding_type must be one of {', '.join(EMBEDDING_TYPES)}, got {_shown(value)}", "invalid_value", "embedding_type")
    return value


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {_kind(data)}", "invalid_body")
    return data


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {_kind(value)}", "invalid_type", name)
    return value


def _check_dimensions(value: Any, dim: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"dimensions must be an integer, got {_kind(value)}", "invalid_type", "dimensions")
    if value != dim:
        raise ApiError(
            400,
            f"dimensions={value} is not available: this model gives {dim}-dimensional vectors and was not trained for "
            "shorter ones (omit dimensions, or send it equal to the model's dimension)",
            "invalid_dimensions",
            "dimensions",
        )


def _instruction(body: dict[str, Any], given: str | None, named: str, instructions: dict[str, str]) -> str | None:
    """The instruction for plain-string items: given as text (``given`` field) or by name from ``--instructions``."""
    text = body.get(given) if given else None
    name = body.get(named)
    if text is not None and name is not None:
        raise ApiError(400, f"send either {given} or {named}, not both", "conflicting_fields", named)
    if text is not None:
        if not isinstance(text, str):
            raise ApiError(400, f"{given} must be a string, got {_kind(text)}", "invalid_type", given)
        if has_lone_surrogate(text):
            raise ApiError(400, f"{given} is invalid unicode (lone surrogate)", "invalid_unicode", given)
        return text
    if name is None:
        return None
    if not isinstance(name, str):
        raise ApiError(400, f"{named} must be a string, got {_kind(name)}", "invalid_type", named)
    if name not in instructions:
        known = ", ".join(sorted(instructions)) if instructions else "none (start the server with --instructions FILE.json)"
        raise ApiError(400, f"unknown {named} {_shown(name)}; known names: {known}", "unknown_instruction", named)
    return instructions[name]


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def _items(body: dict[str, Any], field: str, instruction: str | None, max_items: int) -> list[InputItem]:
    if field not in body or body[field] is None:
        raise ApiError(400, f"{field} is required: a string or a list of strings, [instruction, text] or [instruction, text, k]", "missing_field", field)
    value = body[field]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ApiError(400, f"{field} must be a string or a list, got {_kind(value)}", "invalid_type", field)
    if not value:
        raise ApiError(400, f"{field} is empty: send at least one item", "empty_input", field)
    if _is_token_ids(value):
        raise ApiError(400, f"{field} is a list of token ids: this server takes text (instructions are tokenized with it)", "token_ids_unsupported", field)
    if len(value) > max_items:
        raise ApiError(413, f"{field} has {len(value)} items, over the limit of {max_items} per request (--max-request-items)", "too_many_items", field)
    items: list[InputItem] = []
    for i, item in enumerate(value):
        if _is_token_ids(item):
            raise ApiError(400, f"{field}[{i}]: a list of token ids; this server takes text", "token_ids_unsupported", field)
        try:
            parse_input(item, i)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, f"{field}[{i}]: {str(exc).split(': ', 1)[-1]}", "invalid_item", field) from exc
        items.append([instruction, item] if instruction is not None and isinstance(item, str) else item)
    return items
