"""Errors in the envelope of the API a path belongs to: OpenAI's
{"error": {"message", "type", "param", "code"}}, or under /v1/messages Anthropic's
{"type": "error", "error": {"type", "message"}}."""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from typing import Callable, Literal, TypeVar

from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from spool.protocol import Failed

# Inside a union pydantic names the member type ("str", "list[TextPart]") in an error's
# location: the field's name ends there.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


Stored = TypeVar("Stored")


def stored_or_404(get: Callable[[str], Stored | None], check: Callable[[str], str], kind: str,
                  object_id: str) -> Stored:
    """The stored object `object_id`; a 404 for one that does not exist or an id that
    `check` refuses (a path traversal is no object's id), in OpenAI's words."""
    try:
        found = get(check(object_id))
    except ValueError:
        found = None
    if found is None:
        name = kind.lower()
        raise APIError(404, f"No such {kind} object: {object_id}", param=f"{name}_id", code=f"{name}_not_found")
    return found


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


ANTHROPIC_PREFIX = "/v1/messages"
# Anthropic's error types by status; any other status is an `api_error`.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error"}


class APIError(HTTPException):
    """An error answered in OpenAI's envelope. FastAPI's HTTPException so that raising it
    while the body is read (the size limit) is not turned into a generic 400."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(status, message)
        kind = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.detail_model = ErrorDetail(message=message, type=kind, param=param, code=code)

    @classmethod
    def of(cls, failed: Failed) -> "APIError":
        """Rank 0's error event as an HTTP error."""
        return cls(failed.status, failed.message, code=failed.code)

    def envelope(self) -> ErrorResponse:
        return ErrorResponse(error=self.detail_model)

    def anthropic_envelope(self) -> AnthropicErrorResponse:
        kind = _ANTHROPIC_TYPES.get(self.status_code, "api_error")
        return AnthropicErrorResponse(error=AnthropicErrorDetail(type=kind, message=self.detail_model.message))


def error_json(path: str, err: APIError) -> JSONResponse:
    body = err.anthropic_envelope() if path.startswith(ANTHROPIC_PREFIX) else err.envelope()
    return JSONResponse(body.model_dump(), status_code=err.status_code)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if not isinstance(exc, APIError):
        exc = APIError(exc.status_code, str(exc.detail))
    return error_json(request.url.path, exc)


def invalid_value(error: dict, loc: tuple, prefix: str = "") -> APIError:
    """A 400 for one of pydantic's validation errors, naming the field at `loc` (under
    `prefix`) as its param."""
    fields = [prefix] if prefix else []
    for part in loc:
        if str(part) in _TYPE_TAGS or "[" in str(part):
            break
        fields.append(str(part))
    param = ".".join(fields) or None
    message = f"{param}: {error['msg']}" if param else error["msg"]
    return APIError(400, message, param=param, code="invalid_value")


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    err = invalid_value(first, first.get("loc", ())[1:])  # [0] is "body"
    if first.get("type") == "json_invalid":
        err = APIError(400, "the request body is not valid JSON", param=err.detail_model.param, code="invalid_value")
    return error_json(request.url.path, err)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises it afterwards, so uvicorn logs the traceback.
    return error_json(request.url.path, APIError(500, "internal server error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)


# For the OpenAPI schema of the routes.
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503, 504)}
