"""One request's answer as an Anthropic message: whole, or as its stream's events
(message_start, content_block_start, ping, content_block_delta, content_block_stop,
message_delta, message_stop)."""

from __future__ import annotations

import json

from http_api.anthropic.schemas import MessageResponse, MessageUsage, TextContent
from http_api.errors import APIError
from spool.protocol import Final

_STOP_REASONS = {"length": "max_tokens", "stop": "end_turn", "cancelled": None}


def event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"


def _usage(final: Final) -> MessageUsage:
    cached = final.usage.prompt_tokens_details.cached_tokens
    return MessageUsage(input_tokens=final.usage.prompt_tokens - cached, output_tokens=final.usage.completion_tokens,
                        cache_read_input_tokens=cached)


def _stop_reason(final: Final) -> str | None:
    return "stop_sequence" if final.stop_sequence is not None else _STOP_REASONS[final.finish_reason]


class MessageReply:
    keepalive = event("ping", {})

    def __init__(self, request_id: str, model: str, prompt_tokens: int) -> None:
        self.id, self.model, self.prompt_tokens = f"msg_{request_id}", model, prompt_tokens

    def whole(self, text: str, final: Final, logprobs: None = None) -> MessageResponse:
        return MessageResponse(id=self.id, model=self.model, content=[TextContent(text=text)],
                               stop_reason=_stop_reason(final), stop_sequence=final.stop_sequence,
                               usage=_usage(final))

    def opening(self) -> list[str]:
        message = MessageResponse(id=self.id, model=self.model, content=[],
                                  usage=MessageUsage(input_tokens=self.prompt_tokens, output_tokens=0))
        return [event("message_start", {"message": message.model_dump()}),
                event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
                self.keepalive]

    def delta(self, text: str, logprobs: None = None) -> list[str]:
        return [event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})]

    def closing(self, final: Final) -> list[str]:
        stop = {"stop_reason": _stop_reason(final), "stop_sequence": final.stop_sequence}
        return [event("content_block_stop", {"index": 0}),
                event("message_delta", {"delta": stop, "usage": _usage(final).model_dump()}),
                event("message_stop", {})]

    def failure(self, err: APIError) -> str:
        return f"event: error\ndata: {err.anthropic_envelope().model_dump_json()}\n\n"
