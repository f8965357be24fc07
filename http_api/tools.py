"""Tool calling, for OpenAI's chat completions and Anthropic's messages alike: the tools go
into the model's chat template, tool calls are parsed out of its output with mlx-lm's
parser for that template, and a forced call (OpenAI's "required" or a named function,
Anthropic's "any" or "tool") is enforced with a grammar."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from llguidance import LLMatcher

from http_api.errors import APIError


@dataclass(frozen=True)
class ToolSpec:
    """A request's tools in the template's (OpenAI's function) shape, and what it asks of them."""

    tools: list[dict]  # {"type": "function", "function": {"name", "description", "parameters"}}
    choice: Literal["auto", "none", "required"]  # "required": some tool must be called
    named: str | None = None  # the one tool that must be called
    parallel: bool = True  # more than one call allowed; if not, see `one_call` and the forced grammar

    @property
    def forced(self) -> bool:
        return bool(self.tools) and (self.choice == "required" or self.named is not None)

    @property
    def one_call(self) -> bool:
        """At most one call, left to the model: its output stops at the end of its first
        call (the template's end marker as a stop string). A forced call's grammar
        already counts the calls."""
        return not self.parallel and not self.forced and self.template_tools() is not None

    def template_tools(self) -> list[dict] | None:
        """The tools for the chat template; none when the model must not call one."""
        return self.tools if self.tools and self.choice != "none" else None


@dataclass(frozen=True)
class ParsedCall:
    """A tool call the model wrote; each API gives it its own id and shape."""

    name: str
    arguments: Any  # what the model wrote as the call's arguments, parsed when it is JSON


def _parser_module(tokenizer: Any) -> str:
    return getattr(tokenizer.tool_parser, "__module__", "")


def check_tools(tokenizer: Any, spec: ToolSpec) -> None:
    if not spec.tools and (spec.choice == "required" or spec.named is not None):
        raise APIError(400, "tool_choice asks for a tool call, but there are no tools", param="tool_choice")
    if spec.tools and spec.choice != "none" and not tokenizer.has_tool_calling:
        raise APIError(400, "this model's chat template has no tool calling; send no tools", param="tools")
    if spec.named is not None and spec.named not in {t["function"]["name"] for t in spec.tools}:
        raise APIError(400, f"tool_choice names '{spec.named}', which is not among the tools", param="tool_choice")


def tool_grammar(tokenizer: Any, spec: ToolSpec) -> str | None:
    """For a forced call: the grammar of the calls the model's template writes (mlx-lm's
    json_tools format: <tool_call>{json}</tool_call>)."""
    if not spec.forced:
        return None
    if not _parser_module(tokenizer).endswith(".json_tools"):
        raise APIError(400, "this model's tool call format cannot be enforced; let the model choose",
                       param="tool_choice")
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "arguments": t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False}
             for t in spec.tools if spec.named is None or t["function"]["name"] == spec.named]
    # Compact JSON, as for response_format: a weak model may pad flexible whitespace forever.
    schema = json.dumps((calls[0] if len(calls) == 1 else {"anyOf": calls})
                        | {"x-guidance": {"whitespace_flexible": False}})
    # A named tool is called once; otherwise several calls unless parallel calls are off.
    more = ' ("\\n" call)*' if spec.named is None and spec.parallel else ""
    lark = (f'start: call{more}\ncall: "{tokenizer.tool_call_start}\\n" body "\\n{tokenizer.tool_call_end}"\n'
            f"body: %json {schema}\n")
    grammar = LLMatcher.grammar_from_lark(lark)
    if error := LLMatcher.validate_grammar(grammar):
        raise APIError(400, f"the tools' parameters cannot be enforced: {error}", param="tools",
                       code="invalid_schema")
    return grammar


class ToolCallText:
    """Splits a chat reply's text into content and tool calls as it arrives: text
    between the template's call markers is held until the call ends, then parsed. With
    `one_call`, the output stopped at its first call's end marker (a stop string, so not
    in the text): that ends the call."""

    def __init__(self, tokenizer: Any, tools: list[dict], one_call: bool = False) -> None:
        self.start, self.end = tokenizer.tool_call_start, tokenizer.tool_call_end
        self.parse, self.tools, self.one_call = tokenizer.tool_parser, tools, one_call
        self.pending = ""
        self.calls = 0

    def feed(self, text: str) -> list[str | ParsedCall]:
        """What `text` completes, in order: content that is safe to send now, and calls."""
        self.pending += text
        pieces: list[str | ParsedCall] = []
        while True:
            at = self.pending.find(self.start)
            if at < 0:
                # Keep what could be the start of a marker.
                keep = next((n for n in range(min(len(self.pending), len(self.start) - 1), 0, -1)
                             if self.start.startswith(self.pending[-n:])), 0)
                pieces.append(self.pending[:len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                return [piece for piece in pieces if piece]
            pieces.append(self.pending[:at])
            close = self.pending.find(self.end, at + len(self.start))
            if close < 0:
                self.pending = self.pending[at:]
                return [piece for piece in pieces if piece]
            pieces.append(self._call(self.pending[at + len(self.start):close]))
            self.pending = self.pending[close + len(self.end):]

    def stopped_at_call_end(self, stop_sequence: str | None) -> bool:
        """Whether the output ended at the end marker this parser asked to stop at."""
        return self.one_call and stop_sequence == self.end

    def finish(self, stop_sequence: str | None = None) -> list[str | ParsedCall]:
        """What is left at the end, in order (an unfinished call stays text); a call the
        output stopped at the end of is completed."""
        ended = self.stopped_at_call_end(stop_sequence) and self.pending.startswith(self.start)
        pieces = self.feed(self.end) if ended else []
        rest, self.pending = self.pending, ""
        return pieces + ([rest] if rest else [])

    def split(self, text: str, stop_sequence: str | None = None, last: bool = False) -> tuple[str, list[ParsedCall]]:
        """`feed` (and with `last`, `finish`), as the content and the calls apart."""
        pieces = self.feed(text) + (self.finish(stop_sequence) if last else [])
        return "".join(p for p in pieces if isinstance(p, str)), [p for p in pieces if isinstance(p, ParsedCall)]

    def _call(self, text: str) -> ParsedCall:
        try:
            parsed = self.parse(text, self.tools)
            call = ParsedCall(parsed["name"], parsed.get("arguments", {}))
        except (ValueError, KeyError, TypeError) as err:
            raise APIError(500, f"the model wrote a tool call that cannot be parsed: {err}", code="bad_tool_call")
        self.calls += 1
        return call
