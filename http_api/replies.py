"""The OpenAI objects of one request's answer, chat or text completion, with its n
choices: the whole reply, or the server-sent events of a streamed one."""

from __future__ import annotations

import json
import secrets
from typing import Callable

from pydantic import BaseModel

from http_api.errors import APIError
from http_api.logprobs import LogprobText
from http_api.schemas import (
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChunkChoice, ChunkDelta, Completion,
    ChoiceLogprobs, CompletionChoice, CompletionLogprobs, FunctionCall, ToolCall, ToolCallChunk,
)
from http_api.streaming import Outcome
from http_api.tools import ParsedCall, ToolCallText
from spool.protocol import Final, TokenLogprob, Usage


def sse(obj: BaseModel) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


def tool_call(call: ParsedCall) -> ToolCall:
    arguments = call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)
    return ToolCall(id=f"call_{secrets.token_hex(12)}", function=FunctionCall(name=call.name, arguments=arguments))


class OpenAIReply:
    """What chat and text completions share: the stream's end, errors and keep-alives."""

    keepalive = ": keep-alive\n\n"

    def __init__(self, id: str, created: int, model: str, include_usage: bool) -> None:
        self.id, self.created, self.model, self.include_usage = id, created, model, include_usage

    def failure(self, err: APIError) -> str:
        return sse(err.envelope())

    def _end(self, usage: BaseModel) -> list[str]:
        """The usage chunk when asked for, and [DONE]."""
        return [*([sse(usage)] if self.include_usage else []), "data: [DONE]\n\n"]


class ChatReply(OpenAIReply):
    """With `tool_text`, tool calls in the model's text come out as `tool_calls`: each
    choice gets its own parser from it."""

    def __init__(self, request_id: str, created: int, model: str, choices: int = 1, include_usage: bool = False,
                 tool_text: Callable[[], ToolCallText] | None = None,
                 logprob_text: LogprobText | None = None) -> None:
        super().__init__(f"chatcmpl-{request_id}", created, model, include_usage)
        self.choices = choices
        self.tool_texts = [tool_text() for _ in range(choices)] if tool_text is not None else None
        self.logprob_text = logprob_text

    def _logprobs(self, items: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
        return self.logprob_text.chat(items) if self.logprob_text is not None and items is not None else None

    def _chunk(self, index: int, delta: ChunkDelta, finish_reason: str | None = None,
               logprobs: ChoiceLogprobs | None = None) -> ChatCompletionChunk:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def _finish_reason(self, index: int, final: Final) -> str:
        called = self.tool_texts is not None and self.tool_texts[index].calls > 0
        return "tool_calls" if called and final.finish_reason == "stop" else final.finish_reason

    def opening(self) -> list[str]:
        return [sse(self._chunk(i, ChunkDelta(role="assistant", content=""))) for i in range(self.choices)]

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob] | None = None) -> list[str]:
        if self.tool_texts is None:
            return [sse(self._chunk(index, ChunkDelta(content=text), logprobs=self._logprobs(logprobs)))]
        calls_before = self.tool_texts[index].calls
        content, calls = self.tool_texts[index].split(text)
        return self._content_and_calls(index, content, calls, calls_before, logprobs)

    def _content_and_calls(self, index: int, content: str, calls: list[ParsedCall], calls_before: int,
                           logprobs: list[TokenLogprob] | None) -> list[str]:
        frames = []
        if content:
            frames.append(sse(self._chunk(index, ChunkDelta(content=content), logprobs=self._logprobs(logprobs))))
        for number, call in enumerate(calls, start=calls_before):
            chunk = ToolCallChunk(index=number, **tool_call(call).model_dump())
            frames.append(sse(self._chunk(index, ChunkDelta(tool_calls=[chunk]))))
        return frames

    def choice_end(self, index: int, final: Final) -> list[str]:
        frames = []
        if self.tool_texts is not None:
            calls_before = self.tool_texts[index].calls
            rest, calls = self.tool_texts[index].split("", final.stop_sequence, last=True)
            frames = self._content_and_calls(index, rest, calls, calls_before, None)
        return frames + [sse(self._chunk(index, ChunkDelta(), self._finish_reason(index, final)))]

    def closing(self, finals: list[Final], usage: Usage) -> list[str]:
        return self._end(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                             usage=usage))

    def _choice(self, index: int, outcome: Outcome) -> ChatChoice:
        calls: list[ToolCall] = []
        content: str | None = outcome.text
        if self.tool_texts is not None:
            content, parsed = self.tool_texts[index].split(outcome.text, outcome.final.stop_sequence, last=True)
            calls = [tool_call(call) for call in parsed]
            if calls and not content.strip():
                content = None
        message = AssistantMessage(content=content, tool_calls=calls or None)
        return ChatChoice(index=index, message=message, finish_reason=self._finish_reason(index, outcome.final),
                          logprobs=self._logprobs(outcome.logprobs))

    def whole(self, outcomes: list[Outcome], usage: Usage) -> BaseModel:
        return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage,
                              choices=[self._choice(i, outcome) for i, outcome in enumerate(outcomes)])


class CompletionReply(OpenAIReply):
    def __init__(self, request_id: str, created: int, model: str, choices: int = 1, include_usage: bool = False,
                 logprob_text: LogprobText | None = None) -> None:
        super().__init__(f"cmpl-{request_id}", created, model, include_usage)
        self.logprob_text = logprob_text
        self.offsets = [0] * choices  # characters of each choice's text sent, where its next text_offset starts

    def _logprobs(self, index: int, items: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        if self.logprob_text is None or items is None:
            return None
        logprobs = self.logprob_text.completion(items, self.offsets[index])
        self.offsets[index] += sum(map(len, logprobs.tokens))
        return logprobs

    def _make(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def opening(self) -> list[str]:
        return []

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob] | None = None) -> list[str]:
        return [sse(self._make([CompletionChoice(index=index, text=text, logprobs=self._logprobs(index, logprobs))]))]

    def choice_end(self, index: int, final: Final) -> list[str]:
        return [sse(self._make([CompletionChoice(index=index, text="", finish_reason=final.finish_reason)]))]

    def closing(self, finals: list[Final], usage: Usage) -> list[str]:
        return self._end(self._make([], usage))

    def whole(self, outcomes: list[Outcome], usage: Usage) -> BaseModel:
        return self._make([CompletionChoice(index=i, text=o.text, finish_reason=o.final.finish_reason,
                                            logprobs=self._logprobs(i, o.logprobs))
                           for i, o in enumerate(outcomes)], usage)
