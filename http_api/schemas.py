"""OpenAI's request and response bodies, as pydantic models: FastAPI validates requests
against them and documents both in the OpenAPI schema. Usage is the spool's own type,
so rank 0's figures reach the client in one shape."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from http_api.grammar import json_grammar
from http_api.tools import ToolSpec
from spool.protocol import SamplingParams, Supervision, Usage

MAX_STOP_STRINGS = 16
MAX_CHOICES = 16  # n: each choice is a sequence of its own on the ring


# Requests: a field we do not support is refused (400 naming it), never silently ignored.


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result answers this call

    def for_template(self) -> dict:
        """The message as chat templates take it: a call's arguments as an object."""
        message: dict = {"role": self.role, "content": self.text()}
        if self.name:
            message["name"] = self.name
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _json_object(c.function.arguments)}} for c in self.tool_calls]
        return message

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


def _json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # enforced by grammar only with tool_choice "required" or named


class ToolDef(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchemaFormat(Strict):
    name: str
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # enforced either way


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self


class GenerationRequest(Strict):
    """Fields shared by chat and text completions. None means "the default" throughout,
    since some clients send explicit nulls. Penalties and logit_bias act as mlx-lm's
    logits processors do (penalties over the last 20 tokens)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    # Accepted because they cannot change the output.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # rank 0's prompt cache finds shared prefixes by itself
    prompt_cache_retention: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias: dict[int, float] | None) -> dict[int, float] | None:
        if bias and not all(-100 <= value <= 100 for value in bias.values()):
            raise ValueError("logit_bias values must be between -100 and 100")
        return bias

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if not all(stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def choices(self) -> int:
        return self.n or 1

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def grammar(self) -> str | None:
        """What the output must follow, as a grammar for rank 0; None for free text."""
        kind = self.response_format.type if self.response_format else "text"
        if kind == "json_object":
            return json_grammar({"type": "object"}, "response_format")
        if kind == "json_schema":
            return json_grammar(self.response_format.json_schema.json_schema, "response_format.json_schema.schema")
        return None

    def sampling(self, defaults: SamplingParams) -> SamplingParams:
        """The request's sampling fields over the served model's defaults."""
        given = {name: value for name in SamplingParams.model_fields
                 if (value := getattr(self, name, None)) is not None}
        return defaults.model_copy(update=given)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def wanted_logprobs(self) -> int | None:
        """Top alternatives per token when log-probabilities are wanted, else None."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict]:
        """The conversation as a chat template takes it."""
        return [m.for_template() for m in self.messages]

    def tool_spec(self) -> ToolSpec:
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        choice = self.tool_choice if isinstance(self.tool_choice, str) else "auto" if named is None else "required"
        return ToolSpec([t.model_dump(exclude_none=True) for t in self.tools or []], choice, named,
                        self.parallel_tool_calls is not False)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str
    logprobs: int | None = Field(None, ge=0, le=5)

    def wanted_logprobs(self) -> int | None:
        return self.logprobs


# Responses


def _is_none(value: Any) -> bool:
    return value is None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ContentLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ContentLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=_is_none)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallChunk(ToolCall):
    index: int


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)
    tool_calls: list[ToolCallChunk] | None = Field(None, exclude_if=_is_none)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_is_none)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A text completion, and also each chunk of a streamed one (OpenAI uses one shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_is_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlx-ring"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    """`status` and `reason`, plus whatever rank 0 put in its heartbeat."""

    model_config = ConfigDict(extra="allow")
    status: Literal["ok", "unavailable"]
    reason: str | None = None
    queue_depth: int
    supervisor: Supervision | None = None  # None when the ring runs without one
