"""The OpenAI objects of one request's answer, chat or text completion: the whole reply,
or the server-sent events of a streamed one."""

from __future__ import annotations

from pydantic import BaseModel

from http_api.errors import APIError
from http_api.schemas import (
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChunkChoice, ChunkDelta, Completion,
    ChoiceLogprobs, CompletionChoice, CompletionLogprobs, ToolCall, ToolCallChunk,
)
from http_api.logprobs import LogprobText
from http_api.tools import ToolCallText
from spool.protocol import Final, TokenLogprob


def sse(obj: BaseModel) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


class OpenAIReply:
    """What chat and text completions share: the stream's end, errors and keep-alives."""

    keepalive = ": keep-alive\n\n"

    def __init__(self, id: str, created: int, model: str, include_usage: bool) -> None:
        self.id, self.created, self.model, self.include_usage = id, created, model, include_usage

    def failure(self, err: APIError) -> str:
        return sse(err.envelope())

    def _end(self, closing: BaseModel, usage: BaseModel) -> list[str]:
        """The closing chunk, the usage chunk when asked for, and [DONE]."""
        return [sse(closing), *([sse(usage)] if self.include_usage else []), "data: [DONE]\n\n"]


class ChatReply(OpenAIReply):
    """With `tool_text`, tool calls in the model's text come out as `tool_calls`."""

    def __init__(self, request_id: str, created: int, model: str, include_usage: bool = False,
                 tool_text: ToolCallText | None = None, logprob_text: LogprobText | None = None) -> None:
        super().__init__(f"chatcmpl-{request_id}", created, model, include_usage)
        self.tool_text, self.logprob_text = tool_text, logprob_text

    def _logprobs(self, items: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
        return self.logprob_text.chat(items) if self.logprob_text is not None and items is not None else None

    def _chunk(self, delta: ChunkDelta, finish_reason: str | None = None,
               logprobs: ChoiceLogprobs | None = None) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason, logprobs=logprobs)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def _finish_reason(self, final: Final) -> str:
        called = self.tool_text is not None and self.tool_text.calls > 0
        return "tool_calls" if called and final.finish_reason == "stop" else final.finish_reason

    def opening(self) -> list[str]:
        return [sse(self._chunk(ChunkDelta(role="assistant", content="")))]

    def delta(self, text: str, logprobs: list[TokenLogprob] | None = None) -> list[str]:
        if self.tool_text is None:
            return [sse(self._chunk(ChunkDelta(content=text), logprobs=self._logprobs(logprobs)))]
        calls_before = self.tool_text.calls
        content, calls = self.tool_text.feed(text)
        frames = []
        if content:
            frames.append(sse(self._chunk(ChunkDelta(content=content), logprobs=self._logprobs(logprobs))))
        for index, call in enumerate(calls, start=calls_before):
            chunk = ToolCallChunk(index=index, **call.model_dump())
            frames.append(sse(self._chunk(ChunkDelta(tool_calls=[chunk]))))
        return frames

    def closing(self, final: Final) -> list[str]:
        rest = self.tool_text.finish() if self.tool_text is not None else ""
        frames = [sse(self._chunk(ChunkDelta(content=rest)))] if rest else []
        usage = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=final.usage)
        return frames + self._end(self._chunk(ChunkDelta(), self._finish_reason(final)), usage)

    def whole(self, text: str, final: Final, logprobs: list[TokenLogprob] | None = None) -> BaseModel:
        calls: list[ToolCall] = []
        content: str | None = text
        if self.tool_text is not None:
            content, calls = self.tool_text.feed(text)
            content += self.tool_text.finish()
            if calls and not content.strip():
                content = None
        message = AssistantMessage(content=content, tool_calls=calls or None)
        choice = ChatChoice(message=message, finish_reason=self._finish_reason(final), logprobs=self._logprobs(logprobs))
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice],
                              usage=final.usage)


class CompletionReply(OpenAIReply):
    def __init__(self, request_id: str, created: int, model: str, include_usage: bool = False,
                 logprob_text: LogprobText | None = None) -> None:
        super().__init__(f"cmpl-{request_id}", created, model, include_usage)
        self.logprob_text = logprob_text
        self.offset = 0  # characters of text sent, where the next token's text_offset starts

    def _logprobs(self, items: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        if self.logprob_text is None or items is None:
            return None
        logprobs = self.logprob_text.completion(items, self.offset)
        self.offset += sum(map(len, logprobs.tokens))
        return logprobs

    def _make(self, choices: list[CompletionChoice], final: Final | None = None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices,
                          usage=final.usage if final else None)

    def opening(self) -> list[str]:
        return []

    def delta(self, text: str, logprobs: list[TokenLogprob] | None = None) -> list[str]:
        return [sse(self._make([CompletionChoice(text=text, logprobs=self._logprobs(logprobs))]))]

    def closing(self, final: Final) -> list[str]:
        return self._end(self._make([CompletionChoice(text="", finish_reason=final.finish_reason)]),
                         self._make([], final))

    def whole(self, text: str, final: Final, logprobs: list[TokenLogprob] | None = None) -> BaseModel:
        choice = CompletionChoice(text=text, finish_reason=final.finish_reason, logprobs=self._logprobs(logprobs))
        return self._make([choice], final)
