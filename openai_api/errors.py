"""Errors, always in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from spool.protocol import Failed

# Inside a union pydantic names the member type ("str", "list[TextPart]") in an error's
# location: the field's name ends there.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


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


def error_json(status: int, detail: ErrorDetail) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, APIError):
        return error_json(exc.status_code, exc.detail_model)
    kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    return error_json(exc.status_code, ErrorDetail(message=str(exc.detail), type=kind))


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    fields = []
    for part in first.get("loc", ())[1:]:  # [0] is "body"
        if str(part) in _TYPE_TAGS or "[" in str(part):
            break
        fields.append(str(part))
    param = ".".join(fields) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if first.get("type") == "json_invalid":
        message = "the request body is not valid JSON"
    return error_json(400, ErrorDetail(message=message, type="invalid_request_error", param=param,
                                       code="invalid_value"))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises it afterwards, so uvicorn logs the traceback.
    return error_json(500, ErrorDetail(message="internal server error", type="server_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)


# For the OpenAPI schema of the routes.
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503, 504)}
