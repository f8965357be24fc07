"""Structured outputs: a request's `response_format` as the llguidance grammar rank 0
constrains its output with. Checked here, so a schema that cannot be compiled is a 400
before anything is queued."""

from __future__ import annotations

from typing import Any

from llguidance import LLMatcher

from http_api.errors import APIError

# Compact JSON: with flexible whitespace a weak model may pad its output forever.
_JSON_OPTIONS = {"whitespace_flexible": False}


def json_grammar(schema: dict[str, Any], param: str) -> str:
    """The grammar of JSON valid against `schema`; 400 naming `param` if it cannot be made."""
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except ValueError as err:
        raise APIError(400, f"{param}: {err}", param=param, code="invalid_schema") from None
    if error := LLMatcher.validate_grammar(grammar):
        raise APIError(400, f"{param}: the schema cannot be enforced: {error}", param=param,
                       code="invalid_schema")
    return grammar
