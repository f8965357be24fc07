"""The OpenAI objects of one request's answer, chat or text completion: the whole reply,
or the server-sent events of a streamed one."""

from __future__ import annotations

from pydantic import BaseModel

from http_api.errors import APIError
from http_api.schemas import (
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChunkChoice, ChunkDelta, Completion,
    CompletionChoice,
)
from spool.protocol import Final


def sse(obj: BaseModel) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


class OpenAIReply:
    """What chat and text completions share: the stream's end, errors and keep-alives."""

    keepalive = ": keep-alive\n\n"

    def __init__(self, id: str, created: int, model: str, include_usage: bool) -> None:
        self.id, self.created, self.model, self.include_usage = id, created, model, include_usage

    def closing(self, final: Final) -> list[str]:
        frames = [sse(self._closing_chunk(final.finish_reason))]
        if self.include_usage:
            frames.append(sse(self._usage_chunk(final)))
        return frames + ["data: [DONE]\n\n"]

    def failure(self, err: APIError) -> str:
        return sse(err.envelope())

    def _closing_chunk(self, finish_reason: str) -> BaseModel:
        raise NotImplementedError

    def _usage_chunk(self, final: Final) -> BaseModel:
        raise NotImplementedError


class ChatReply(OpenAIReply):
    def __init__(self, request_id: str, created: int, model: str, include_usage: bool = False) -> None:
        super().__init__(f"chatcmpl-{request_id}", created, model, include_usage)

    def _chunk(self, delta: ChunkDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def opening(self) -> list[str]:
        return [sse(self._chunk(ChunkDelta(role="assistant", content="")))]

    def delta(self, text: str) -> list[str]:
        return [sse(self._chunk(ChunkDelta(content=text)))]

    def _closing_chunk(self, finish_reason: str) -> BaseModel:
        return self._chunk(ChunkDelta(), finish_reason)

    def _usage_chunk(self, final: Final) -> BaseModel:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=final.usage)

    def whole(self, text: str, final: Final) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=final.finish_reason)
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice],
                              usage=final.usage)


class CompletionReply(OpenAIReply):
    def __init__(self, request_id: str, created: int, model: str, include_usage: bool = False) -> None:
        super().__init__(f"cmpl-{request_id}", created, model, include_usage)

    def _make(self, choices: list[CompletionChoice], final: Final | None = None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices,
                          usage=final.usage if final else None)

    def opening(self) -> list[str]:
        return []

    def delta(self, text: str) -> list[str]:
        return [sse(self._make([CompletionChoice(text=text)]))]

    def _closing_chunk(self, finish_reason: str) -> BaseModel:
        return self._make([CompletionChoice(text="", finish_reason=finish_reason)])

    def _usage_chunk(self, final: Final) -> BaseModel:
        return self._make([], final)

    def whole(self, text: str, final: Final) -> BaseModel:
        return self._make([CompletionChoice(text=text, finish_reason=final.finish_reason)], final)
