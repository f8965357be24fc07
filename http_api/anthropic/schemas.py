"""Anthropic's Messages API bodies, as pydantic models. A field we do not support is
refused (400 naming it), never silently ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from http_api.schemas import MAX_STOP_STRINGS, Strict
from http_api.tools import ToolSpec


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # a caching hint: cannot change the output


class ToolUseBlock(Strict):
    """A tool call the assistant made earlier in the conversation."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(Strict):
    """A tool's answer to a call, in a user turn."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False
    cache_control: dict[str, Any] | None = None

    def for_template(self) -> dict:
        """As the tool turn chat templates take (OpenAI's role "tool"); a failed tool's
        text says so, since templates have no place for the flag."""
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return {"role": "tool", "tool_call_id": self.tool_use_id, "content": f"Error: {text}" if self.is_error else text}


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @model_validator(mode="after")
    def _blocks_in_their_turns(self) -> "Message":
        kinds = {b.type for b in self.content} if isinstance(self.content, list) else set()
        if self.role == "user" and "tool_use" in kinds:
            raise ValueError("tool_use blocks belong in assistant turns")
        if self.role == "assistant" and "tool_result" in kinds:
            raise ValueError("tool_result blocks belong in user turns")
        return self

    def for_template(self) -> list[dict]:
        """The turn as chat templates take it: tool results as tool turns first (Anthropic
        puts them first in a user turn), then its text, with an assistant's calls."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        results = [b.for_template() for b in self.content if isinstance(b, ToolResultBlock)]
        text = "".join(b.text for b in self.content if isinstance(b, TextBlock))
        calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
                 for b in self.content if isinstance(b, ToolUseBlock)]
        turn: dict = {"role": self.role, "content": text}
        if calls:
            turn["tool_calls"] = calls
        return results + ([turn] if text or calls or not results else [])


class Metadata(Strict):
    user_id: str | None = None


class Tool(Strict):
    type: Literal["custom"] | None = None  # Anthropic's server tools (web search, bash, ...) are refused
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None  # enforced by grammar only when tool_choice forces a call
    cache_control: dict[str, Any] | None = None

    @field_validator("input_schema")
    @classmethod
    def _an_object(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("type") != "object":
            raise ValueError("input_schema must be a JSON schema of type 'object'")
        return schema

    def for_template(self) -> dict:
        """In the function shape chat templates take (OpenAI's)."""
        function = {"name": self.name, "description": self.description, "parameters": self.input_schema}
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_with_tool(self) -> "ToolChoice":
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name is required with type 'tool', and only then")
        if self.type == "none" and self.disable_parallel_tool_use is not None:
            raise ValueError("disable_parallel_tool_use does not go with type 'none'")
        return self


class CountTokensRequest(Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None

    def chat(self) -> list[dict]:
        """The conversation as a chat template takes it."""
        system = self.system if isinstance(self.system, str) or self.system is None else \
            "".join(b.text for b in self.system)
        turns = [{"role": "system", "content": system}] if system else []
        return turns + [turn for m in self.messages for turn in m.for_template()]

    def tool_spec(self) -> ToolSpec:
        choice = self.tool_choice or ToolChoice(type="auto")
        modes = {"auto": "auto", "none": "none", "any": "required", "tool": "required"}
        return ToolSpec([t.for_template() for t in self.tools or []], modes[choice.type], choice.name,
                        not choice.disable_parallel_tool_use)


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    # Accepted because they cannot change the output.
    metadata: Metadata | None = None
    service_tier: str | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, stops: list[str] | None) -> list[str] | None:
        if stops and len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        if stops and not all(stops):
            raise ValueError("stop sequences must not be empty")
        return stops


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseContent(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class MessageUsage(BaseModel):
    input_tokens: int  # prompt tokens computed, those from the prompt cache aside
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextContent | ToolUseContent]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None = None
    stop_sequence: str | None = None
    usage: MessageUsage


class TokenCount(BaseModel):
    input_tokens: int
