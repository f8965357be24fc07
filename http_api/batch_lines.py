"""The lines of a batch: OpenAI's batch input line, checked against the same request
schemas as an interactive request, and the output line each input line gets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import BaseModel, Field, ValidationError

from http_api.errors import APIError, invalid_value
from http_api.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest, Strict
from spool.batches import BatchError

BODIES: dict[str, type[GenerationRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
}


class BatchInputLine(Strict):
    """One line of a batch input file."""

    custom_id: str = Field(min_length=1)
    method: str
    url: str
    body: dict[str, Any]


class BatchResponse(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any]


class LineError(BaseModel):
    code: str
    message: str


class BatchOutputLine(BaseModel):
    """A line of a batch's output or error file: the answer the endpoint would have given
    (`response`, with its HTTP status), or why the input line could not run (`error`)."""

    id: str
    custom_id: Optional[str]
    response: Optional[BatchResponse] = None
    error: Optional[LineError] = None


@dataclass(frozen=True)
class BadLine(Exception):
    """An input line that cannot run: reported with its number, as OpenAI does."""

    code: str
    message: str
    param: Optional[str] = None

    @classmethod
    def of(cls, err: APIError) -> "BadLine":
        detail = err.detail_model
        return cls(detail.code or "invalid_request", detail.message, detail.param)

    def error(self, line: int) -> BatchError:
        return BatchError(code=self.code, message=self.message, param=self.param, line=line)


def numbered_lines(content: bytes) -> list[tuple[int, bytes]]:
    """The file's non-blank lines with their numbers, from 1."""
    return [(number, line) for number, line in enumerate(content.split(b"\n"), start=1) if line.strip()]


def parse_line(raw: bytes, endpoint: str, model_names: list[str]) -> tuple[str, GenerationRequest]:
    """The line's custom_id and request body, checked as the endpoint checks a request;
    BadLine if it cannot run."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadLine("invalid_json", "this line is not valid JSON") from None
    try:
        line = BatchInputLine.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise BadLine.of(invalid_value(first, first["loc"])) from None
    if line.method != "POST":
        raise BadLine("invalid_value", f"method must be POST; got {line.method!r}", "method")
    if line.url != endpoint:
        raise BadLine("invalid_value", f"url must be the batch's endpoint {endpoint}; got {line.url!r}", "url")
    try:
        body = BODIES[endpoint].model_validate(line.body)
    except ValidationError as err:
        first = err.errors()[0]
        raise BadLine.of(invalid_value(first, first["loc"], prefix="body")) from None
    if body.stream:
        raise BadLine("invalid_value", "stream is not supported in a batch", "body.stream")
    if body.choices() > 1:  # a line is one spool request, under the line's own id
        raise BadLine("invalid_value", "n > 1 is not supported in a batch", "body.n")
    if body.model not in model_names:
        names = ", ".join(f"'{n}'" for n in model_names)
        raise BadLine("model_not_found", f"The model '{body.model}' does not exist; this server serves {names}",
                      "body.model")
    return line.custom_id, body


def given_custom_id(raw: bytes) -> Optional[str]:
    """A bad line's custom_id, when it has a readable one."""
    try:
        custom_id = json.loads(raw).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return custom_id if isinstance(custom_id, str) else None


def check_lines(lines: list[tuple[int, bytes]], endpoint: str, model_names: list[str]) -> list[BatchError]:
    """Every bad line's error, by line number; a custom_id used twice is bad the second time."""
    errors, seen = [], {}
    for number, raw in lines:
        try:
            custom_id, _ = parse_line(raw, endpoint, model_names)
            if custom_id in seen:
                raise BadLine("duplicate_custom_id", f"custom_id {custom_id!r} is on line {seen[custom_id]} already",
                              "custom_id")
            seen[custom_id] = number
        except BadLine as bad:
            errors.append(bad.error(number))
    return errors
