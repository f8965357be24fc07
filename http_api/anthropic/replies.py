"""One request's answer as an Anthropic message: whole, or as its stream's events
(message_start, content_block_start, ping, content_block_delta, content_block_stop,
message_delta, message_stop). With tools, calls in the model's text become tool_use
blocks, streamed as Anthropic does: a block started with an empty input, its input as
input_json_delta, then its stop."""

from __future__ import annotations

import json
import secrets
from typing import Callable

from http_api.anthropic.schemas import MessageResponse, MessageUsage, TextContent, ToolUseContent
from http_api.errors import APIError
from http_api.streaming import Outcome
from http_api.tools import ParsedCall, ToolCallText
from spool.protocol import Final, Usage

_STOP_REASONS = {"length": "max_tokens", "stop": "end_turn", "cancelled": None}


def event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"


def _usage(usage: Usage) -> MessageUsage:
    cached = usage.prompt_tokens_details.cached_tokens
    return MessageUsage(input_tokens=usage.prompt_tokens - cached, output_tokens=usage.completion_tokens,
                        cache_read_input_tokens=cached)


def tool_use(call: ParsedCall) -> ToolUseContent:
    if not isinstance(call.arguments, dict):
        raise APIError(500, f"the model called {call.name} with arguments that are not a JSON object",
                       code="bad_tool_call")
    return ToolUseContent(id=f"toolu_{secrets.token_hex(12)}", name=call.name, input=call.arguments)


class MessageReply:
    """With `tool_text`, the model's tool calls come out as tool_use blocks."""

    keepalive = event("ping", {})

    def __init__(self, request_id: str, model: str, prompt_tokens: int,
                 tool_text: Callable[[], ToolCallText] | None = None) -> None:
        self.id, self.model, self.prompt_tokens = f"msg_{request_id}", model, prompt_tokens
        self.tool_text = tool_text() if tool_text is not None else None
        self.blocks = 0  # content blocks started in the stream
        self.text_open = False  # the last one is a text block still open
        self.space = ""  # whitespace held: it starts a text block only if text follows, or no call does

    def _stop_sequence(self, final: Final) -> str | None:
        """The request's stop sequence that ended the output; not the call's end marker a
        single call stops at."""
        ours = self.tool_text is not None and self.tool_text.stopped_at_call_end(final.stop_sequence)
        return None if ours else final.stop_sequence

    def _stop_reason(self, final: Final) -> str | None:
        if self._stop_sequence(final) is not None:
            return "stop_sequence"
        called = self.tool_text is not None and self.tool_text.calls > 0
        return "tool_use" if called and final.finish_reason == "stop" else _STOP_REASONS[final.finish_reason]

    def whole(self, outcomes: list[Outcome], usage: Usage) -> MessageResponse:
        [outcome] = outcomes  # Anthropic's API has no n
        pieces: list[str | ParsedCall] = [outcome.text]
        if self.tool_text is not None:
            pieces = self.tool_text.feed(outcome.text) + self.tool_text.finish(outcome.final.stop_sequence)
        content: list[TextContent | ToolUseContent] = []
        for piece in pieces:
            if isinstance(piece, ParsedCall):
                content.append(tool_use(piece))
            elif content and isinstance(content[-1], TextContent):
                content[-1].text += piece
            else:
                content.append(TextContent(text=piece))
        # Text around calls that is only whitespace is no block, as in Anthropic's replies.
        if any(isinstance(block, ToolUseContent) for block in content):
            content = [b for b in content if not isinstance(b, TextContent) or b.text.strip()]
        return MessageResponse(id=self.id, model=self.model, content=content or [TextContent(text="")],
                               stop_reason=self._stop_reason(outcome.final),
                               stop_sequence=self._stop_sequence(outcome.final), usage=_usage(usage))

    # The stream: blocks are numbered as they start.

    def _start_text(self) -> list[str]:
        self.text_open = True
        self.blocks += 1
        return [event("content_block_start", {"index": self.blocks - 1, "content_block": {"type": "text", "text": ""}})]

    def _stop_open(self) -> list[str]:
        if not self.text_open:
            return []
        self.text_open = False
        return [event("content_block_stop", {"index": self.blocks - 1})]

    def _text(self, text: str) -> list[str]:
        frames = [] if self.text_open else self._start_text()
        return frames + [event("content_block_delta", {"index": self.blocks - 1,
                                                       "delta": {"type": "text_delta", "text": text}})]

    def _tool_use(self, call: ParsedCall) -> list[str]:
        block = tool_use(call)
        frames, index = self._stop_open(), self.blocks
        self.blocks += 1
        start = {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}
        partial = {"type": "input_json_delta", "partial_json": json.dumps(block.input)}
        return frames + [event("content_block_start", {"index": index, "content_block": start}),
                         event("content_block_delta", {"index": index, "delta": partial}),
                         event("content_block_stop", {"index": index})]

    def opening(self) -> list[str]:
        message = MessageResponse(id=self.id, model=self.model, content=[],
                                  usage=MessageUsage(input_tokens=self.prompt_tokens, output_tokens=0))
        # Without tools the text block opens at once, as Anthropic's does; with them the
        # first block may be a tool_use one.
        text = self._start_text() if self.tool_text is None else []
        return [event("message_start", {"message": message.model_dump()}), *text, self.keepalive]

    def delta(self, index: int, text: str, logprobs: None = None) -> list[str]:
        if self.tool_text is None:
            return self._text(text)
        return [frame for piece in self.tool_text.feed(text) for frame in self._piece(piece)]

    def _piece(self, piece: str | ParsedCall) -> list[str]:
        if isinstance(piece, ParsedCall):
            self.space = ""
            return self._tool_use(piece)
        if not self.text_open and not piece.strip():
            self.space += piece
            return []
        text, self.space = self.space + piece, ""
        return self._text(text)

    def choice_end(self, index: int, final: Final) -> list[str]:
        rest = self.tool_text.finish(final.stop_sequence) if self.tool_text is not None else []
        frames = [frame for piece in rest for frame in self._piece(piece)]
        if self.space and not self.tool_text.calls:
            frames += self._text(self.space)
        if not self.blocks:  # nothing at all: one empty text block, as in the whole reply
            frames += self._start_text()
        return frames + self._stop_open()

    def closing(self, finals: list[Final], usage: Usage) -> list[str]:
        [final] = finals
        stop = {"stop_reason": self._stop_reason(final), "stop_sequence": self._stop_sequence(final)}
        return [event("message_delta", {"delta": stop, "usage": _usage(usage).model_dump()}),
                event("message_stop", {})]

    def failure(self, err: APIError) -> str:
        return f"event: error\ndata: {err.anthropic_envelope().model_dump_json()}\n\n"
