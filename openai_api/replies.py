"""The OpenAI objects of one request's answer, chat or text completion: the whole reply,
or the chunks of a streamed one."""

from __future__ import annotations

from pydantic import BaseModel

from openai_api.schemas import (
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChunkChoice, ChunkDelta, Completion,
    CompletionChoice,
)
from spool.protocol import Usage


class ChatReply:
    def __init__(self, request_id: str, created: int, model: str) -> None:
        self.id, self.created, self.model = f"chatcmpl-{request_id}", created, model

    def _chunk(self, delta: ChunkDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def opening(self) -> BaseModel | None:
        return self._chunk(ChunkDelta(role="assistant", content=""))

    def delta(self, text: str) -> BaseModel:
        return self._chunk(ChunkDelta(content=text))

    def closing(self, finish_reason: str) -> BaseModel:
        return self._chunk(ChunkDelta(), finish_reason)

    def usage(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def whole(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage)


class CompletionReply:
    def __init__(self, request_id: str, created: int, model: str) -> None:
        self.id, self.created, self.model = f"cmpl-{request_id}", created, model

    def _make(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def opening(self) -> BaseModel | None:
        return None

    def delta(self, text: str) -> BaseModel:
        return self._make([CompletionChoice(text=text)])

    def closing(self, finish_reason: str) -> BaseModel:
        return self._make([CompletionChoice(text="", finish_reason=finish_reason)])

    def usage(self, usage: Usage) -> BaseModel:
        return self._make([], usage)

    def whole(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        return self._make([CompletionChoice(text=text, finish_reason=finish_reason)], usage)


Reply = ChatReply | CompletionReply
