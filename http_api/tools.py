"""Tool calling for chat completions: the tools go into the model's chat template, tool
calls are parsed out of its output with mlx-lm's parser for that template, and
`tool_choice` "required" or a named function is enforced with a grammar."""

from __future__ import annotations

import json
import secrets
from typing import Any

from llguidance import LLMatcher

from http_api.errors import APIError
from http_api.schemas import ChatCompletionRequest, FunctionCall, ToolCall


def _parser_module(tokenizer: Any) -> str:
    return getattr(tokenizer.tool_parser, "__module__", "")


def check_tools(tokenizer: Any, body: ChatCompletionRequest) -> None:
    if body.tools and body.tool_choice != "none" and not tokenizer.has_tool_calling:
        raise APIError(400, "this model's chat template has no tool calling; send no tools", param="tools")
    named = body.named_tool()
    if named is not None and named not in {t.function.name for t in body.tools or []}:
        raise APIError(400, f"tool_choice names '{named}', which is not among the tools", param="tool_choice")
    if body.forces_tool_call() and body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "tool_choice 'required' or a named function cannot go with response_format",
                       param="tool_choice")


def tool_grammar(tokenizer: Any, body: ChatCompletionRequest) -> str | None:
    """For tool_choice "required" or a named function: the grammar of the calls the
    model's template writes (mlx-lm's json_tools format: <tool_call>{json}</tool_call>)."""
    if not body.forces_tool_call():
        return None
    if not _parser_module(tokenizer).endswith(".json_tools"):
        raise APIError(400, "this model's tool call format cannot be enforced; use tool_choice 'auto'",
                       param="tool_choice")
    named = body.named_tool()
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                               "arguments": t.function.parameters or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False}
             for t in body.tools if named is None or t.function.name == named]
    # Compact JSON, as for response_format: a weak model may pad flexible whitespace forever.
    schema = json.dumps((calls[0] if len(calls) == 1 else {"anyOf": calls})
                        | {"x-guidance": {"whitespace_flexible": False}})
    # A named function is called once; "required" allows several unless parallel_tool_calls is false.
    more = ' ("\\n" call)*' if named is None and body.parallel_tool_calls is not False else ""
    lark = (f'start: call{more}\ncall: "{tokenizer.tool_call_start}\\n" body "\\n{tokenizer.tool_call_end}"\n'
            f"body: %json {schema}\n")
    grammar = LLMatcher.grammar_from_lark(lark)
    if error := LLMatcher.validate_grammar(grammar):
        raise APIError(400, f"the tools' parameters cannot be enforced: {error}", param="tools",
                       code="invalid_schema")
    return grammar


class ToolCallText:
    """Splits a chat reply's text into content and tool calls as it arrives: text
    between the template's call markers is held until the call ends, then parsed."""

    def __init__(self, tokenizer: Any, tools: list[dict]) -> None:
        self.start, self.end = tokenizer.tool_call_start, tokenizer.tool_call_end
        self.parse, self.tools = tokenizer.tool_parser, tools
        self.pending = ""
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Content that is safe to send now, and the calls completed by `text`."""
        self.pending += text
        content, calls = "", []
        while True:
            at = self.pending.find(self.start)
            if at < 0:
                # Keep what could be the start of a marker.
                keep = next((n for n in range(min(len(self.pending), len(self.start) - 1), 0, -1)
                             if self.start.startswith(self.pending[-n:])), 0)
                content += self.pending[:len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                return content, calls
            close = self.pending.find(self.end, at + len(self.start))
            if close < 0:
                content += self.pending[:at]
                self.pending = self.pending[at:]
                return content, calls
            content += self.pending[:at]
            calls.append(self._call(self.pending[at + len(self.start):close]))
            self.pending = self.pending[close + len(self.end):]

    def finish(self) -> str:
        """Text left over at the end (an unfinished call stays text)."""
        rest, self.pending = self.pending, ""
        return rest

    def _call(self, text: str) -> ToolCall:
        try:
            parsed = self.parse(text, self.tools)
        except (ValueError, KeyError, TypeError) as err:
            raise APIError(500, f"the model wrote a tool call that cannot be parsed: {err}", code="bad_tool_call")
        self.calls += 1
        arguments = parsed.get("arguments", {})
        return ToolCall(id=f"call_{secrets.token_hex(12)}", function=FunctionCall(
            name=parsed["name"], arguments=arguments if isinstance(arguments, str) else json.dumps(arguments)))
