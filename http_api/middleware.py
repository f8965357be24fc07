"""The front door: API key and body size, checked before anything parses the body."""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from http_api.errors import APIError, error_json
from http_api.metrics import Metrics

_KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens",
                "/v1/models", "/v1/files", "/v1/batches", "/health", "/metrics", "/", "/v1/cluster",
                "/v1/cluster/events", "/v1/cluster/reset_prefix_cache"}


class FrontDoor:
    """Pure ASGI middleware (no buffering of streamed responses): checks the API key on /v1/,
    limits the body size (to `max_bytes`, or on the paths `larger` names to theirs), and
    counts responses by status."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_bytes: int, metrics: Metrics,
                 larger: dict[str, int] | None = None) -> None:
        self.app, self.api_key, self.max_bytes, self.metrics = app, api_key, max_bytes, metrics
        self.larger = larger or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        max_bytes = self.larger.get(scope["path"], self.max_bytes)
        refusal = self._refusal(scope, max_bytes)
        if refusal is not None:
            return await error_json(scope["path"], refusal)(scope, receive, counting_send)
        await self.app(scope, self._limited(receive, max_bytes), counting_send)

    def _refusal(self, scope: Scope, max_bytes: int) -> APIError | None:
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1/") and not self._authorized(headers):
            return APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>' or 'x-api-key')",
                            code="invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > max_bytes:
            return _too_large(max_bytes)
        return None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        """OpenAI's clients send a bearer token, Anthropic's an x-api-key header."""
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            token = headers.get(b"x-api-key", b"").decode("latin-1")
        return secrets.compare_digest(token.encode(), self.api_key.encode())

    def _limited(self, receive: Receive, max_bytes: int) -> Receive:
        """`receive` that fails once a body without Content-Length grows too large."""
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise _too_large(max_bytes)
            return message

        return wrapped


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"request body larger than {max_bytes} bytes (MAX_REQUEST_BYTES)", code="request_too_large")
