"""Anthropic's Messages API through the official `anthropic` client, against a real rank 0
on the tiny model: text replies equal mlx-lm's greedy output, streamed and not, with
Anthropic's usage, stop reasons, token counts and error envelope; and tool use on a tiny
model whose template takes tools: forced calls whose input validates, streamed as
tool_use blocks, and tool results in the history reaching the template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import anthropic
import httpx
import jsonschema
import pytest
from mlx_lm.utils import load_tokenizer
from harness import KEY, ApiServer, mlx_lm_greedy, spooled_request, tiny_api
from test_tool_calls import WEATHER, make_tool_model


SYSTEM = "Be brief."
MESSAGES = [{"role": "user", "content": "Tell me about the harbour town of Wexley."}]
CHAT = [{"role": "system", "content": SYSTEM}, *MESSAGES]


@pytest.fixture(scope="module")
def model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def api(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    # Anthropic's current client sends no sampling fields: greedy is the operator's default here.
    with tiny_api(model, tmp_path_factory, default_temperature=0.0) as server:
        yield server


def _client(api: ApiServer, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api.url, api_key=key, max_retries=0)


def test_messages_create_matches_mlx_lm(api: ApiServer, model: Path) -> None:
    reference = mlx_lm_greedy(model, CHAT, 12)
    message = _client(api).messages.create(model="tiny", system=SYSTEM, messages=MESSAGES, max_tokens=12)
    assert message.type == "message" and message.role == "assistant" and message.model == "tiny"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == reference.text
    assert message.stop_reason == ("max_tokens" if reference.finish_reason == "length" else "end_turn")
    assert message.usage.output_tokens == len(reference.token_ids)
    count = _client(api).messages.count_tokens(model="tiny", system=SYSTEM, messages=MESSAGES)
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) == count.input_tokens


def test_messages_stream_matches_mlx_lm(api: ApiServer, model: Path) -> None:
    reference = mlx_lm_greedy(model, CHAT, 12)
    with _client(api).messages.stream(model="tiny", system=[{"type": "text", "text": SYSTEM}],
                                      messages=MESSAGES, max_tokens=12) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == reference.text == final.content[0].text
    assert final.usage.output_tokens == len(reference.token_ids)
    with httpx.stream("POST", f"{api.url}/v1/messages", headers={"x-api-key": KEY},
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stream": True}) as response:
        kinds = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}


def test_stop_sequence(api: ApiServer, model: Path) -> None:
    reference = mlx_lm_greedy(model, CHAT, 12)
    stop, before = reference.segments[5], "".join(reference.segments[:5])
    assert stop and reference.text.find(stop) == len(before), reference.segments
    message = _client(api).messages.create(model="tiny", system=SYSTEM, messages=MESSAGES, max_tokens=12,
                                           stop_sequences=["never-seen", stop])
    assert message.content[0].text == before
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop


def test_errors_use_anthropics_envelope(api: ApiServer) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        _client(api).messages.create(model="other", messages=MESSAGES, max_tokens=2)
    assert err.value.body == {"type": "error", "error": {"type": "not_found_error",
                                                        "message": err.value.body["error"]["message"]}}
    with pytest.raises(anthropic.AuthenticationError) as err:
        _client(api, key="wrong").messages.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert err.value.body["error"]["type"] == "authentication_error"
    for extra in ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, {"temperature": 1.5}):
        with pytest.raises(anthropic.BadRequestError) as err:
            _client(api).messages.create(model="tiny", messages=MESSAGES, max_tokens=2, extra_body=extra)
        assert err.value.body["error"]["type"] == "invalid_request_error"
        assert next(iter(extra)) in err.value.body["error"]["message"]


# Tool use, on a tiny model whose chat template takes tools.

TOOLS = [{"name": "get_weather", "description": "Weather forecast", "input_schema": WEATHER},
         {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                               "required": ["zone"], "additionalProperties": False}}]
ASK = [{"role": "user", "content": "What will the weather be in Paris?"}]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tool_model(tmp_path_factory.mktemp("tool-model"))


@pytest.fixture(scope="module")
def tool_api(tool_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with tiny_api(tool_model, tmp_path_factory) as server:
        yield server


def _validate(block, tools: list[dict] = TOOLS) -> None:
    assert block.type == "tool_use" and block.id.startswith("toolu_"), block
    tool = next(t for t in tools if t["name"] == block.name)
    jsonschema.validate(block.input, tool["input_schema"])


FORCED = [{"type": "tool", "name": "get_weather"}, {"type": "any", "disable_parallel_tool_use": True}]


@pytest.mark.parametrize("choice", FORCED, ids=["tool", "any"])
def test_a_forced_tool_is_called(tool_api: ApiServer, choice: dict) -> None:
    message = _client(tool_api).messages.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=80,
                                                tool_choice=choice)
    assert message.stop_reason == "tool_use", message
    [block] = message.content
    assert block.name == choice.get("name", block.name)
    _validate(block)


@pytest.mark.parametrize("choice", FORCED, ids=["tool", "any"])
def test_a_forced_tool_streams_as_a_tool_use_block(tool_api: ApiServer, choice: dict) -> None:
    with _client(tool_api).messages.stream(model="tiny", messages=ASK, tools=TOOLS, max_tokens=80,
                                           tool_choice=choice) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert [b.type for b in starts] == ["tool_use"] and starts[0].input == {}
    assert deltas and {d.type for d in deltas} == {"input_json_delta"}
    assert final.stop_reason == "tool_use"
    [block] = final.content
    assert block.id == starts[0].id and block.name == choice.get("name", block.name)
    _validate(block)
    assert block.input == json.loads("".join(d.partial_json for d in deltas))


def test_tool_results_reach_the_template(tool_api: ApiServer, tool_model: Path) -> None:
    """An assistant's tool_use and the user's tool_result go through the template as the
    call and the tool turn OpenAI's shapes give it."""
    history = ASK + [
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": 2}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {"zone": "PST"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sun"}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "no such zone", "is_error": True},
            {"type": "text", "text": "And tomorrow?"}]}]
    message = _client(tool_api).messages.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4)
    assert message.content[0].type == "text"
    expected = ASK + [
        {"role": "assistant", "content": "Let me look.", "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
            {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "PST"}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sun"},
        # The template has no place for is_error: the text says it.
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no such zone"},
        {"role": "user", "content": "And tomorrow?"}]
    template_tools = [{"type": "function", "function": {"name": t["name"], **({"description": t["description"]}
                       if "description" in t else {}), "parameters": t["input_schema"]}} for t in TOOLS]
    tokens = load_tokenizer(tool_model).apply_chat_template(expected, tools=template_tools, add_generation_prompt=True)
    assert spooled_request(tool_api, message.id.removeprefix("msg_")).prompt_tokens == list(tokens)
    count = _client(tool_api).messages.count_tokens(model="tiny", messages=history, tools=TOOLS)
    assert count.input_tokens == len(tokens)


def test_one_tool_use_stops_at_its_end(tool_api: ApiServer) -> None:
    """disable_parallel_tool_use with the choice left to the model: rank 0 stops the output at
    the end of its first call (tests/test_tool_calls.py shows that stop ending the call)."""
    message = _client(tool_api).messages.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=4,
                                                stop_sequences=["zz"],
                                                tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert spooled_request(tool_api, message.id.removeprefix("msg_")).stop == ["zz", "</tool_call>"]
    assert message.stop_sequence is None and message.stop_reason == "max_tokens"


@pytest.mark.parametrize("patch, named", [
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
    ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "input_schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "nope"),
    ({"tools": TOOLS, "tool_choice": {"type": "tool"}}, "name"),
    ({"tool_choice": {"type": "any"}}, "no tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "auto", "fancy": True}}, "fancy"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}]}]}, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "assistant"),
])
def test_unsupported_tool_fields_are_refused(tool_api: ApiServer, patch: dict, named: str) -> None:
    body = {"model": "tiny", "messages": ASK, "max_tokens": 4} | patch
    response = httpx.post(f"{tool_api.url}/v1/messages", headers={"x-api-key": KEY}, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and named in error["message"], error


def test_tools_on_a_model_without_tool_calling(api: ApiServer) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        _client(api).messages.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=4)
    assert "no tool calling" in err.value.body["error"]["message"]
