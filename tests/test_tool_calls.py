"""Tool calling through the official `openai` client against real ranks, on a tiny model
whose chat template supports tools (mlx-lm reads its calls with its json_tools parser):
a forced call round trip, streamed calls, `tool_choice` none and auto, one call stopping
at its end, and refusals."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Iterator

import jsonschema
import openai
import pytest
from mlx_lm.utils import load_tokenizer
from harness import ApiServer, ring_settings_for, spooled_request, tiny_api

from http_api.anthropic.replies import MessageReply
from http_api.replies import ChatReply
from http_api.streaming import Outcome
from http_api.tools import ToolCallText
from models.tiny import make_tiny_model
from spool.protocol import Final, Usage

# ChatML with Qwen's tool conventions: tools listed in the system turn, calls written as
# <tool_call>{"name": ..., "arguments": ...}</tool_call>, results as tool turns.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these tools:\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    'Answer a call as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call><|im_end|>\n{%- endif %}'
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function %}<tool_call>\n"
    '{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}'
    "\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}},
]
MESSAGES = [{"role": "user", "content": "What will the weather be in Paris?"}]


def make_tool_model(directory: Path) -> Path:
    """A tiny qwen2 whose chat template takes tools."""
    path = make_tiny_model("qwen2", directory / "qwen2")
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"chat_template": TOOLS_TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tool_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def api(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with tiny_api(model, tmp_path_factory) as server:
        yield server


def _client(api: ApiServer) -> openai.OpenAI:
    return api.client(timeout=120)


def test_a_forced_call_round_trip(api: ApiServer) -> None:
    client = _client(api)
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=80, temperature=1.0, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    # The call and its result go back into the conversation; the model answers in text.
    history = MESSAGES + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sun"}'}]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=12, temperature=0)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content


def test_required_calls_stream_as_tool_call_chunks(api: ApiServer) -> None:
    chunks = list(_client(api).chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=80, temperature=1.0, seed=4, stream=True))
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name in ("get_weather", "get_time")
    tool = next(t for t in TOOLS if t["function"]["name"] == calls[0].function.name)
    jsonschema.validate(json.loads(calls[0].function.arguments), tool["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_each_choice_calls_a_tool(api: ApiServer) -> None:
    reply = _client(api).chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80, temperature=1.0, seed=6, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        [call] = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    assert reply.choices[0].message.tool_calls[0].id != reply.choices[1].message.tool_calls[0].id


def test_auto_leaves_the_choice_to_the_model(api: ApiServer) -> None:
    """A random model does not call a tool by itself: its text comes back as content."""
    reply = _client(api).chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=8,
                                                 temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content


def test_one_call_stops_at_its_end(api: ApiServer, model: Path) -> None:
    """parallel_tool_calls false, the choice left to the model: the output stops at the end
    marker of its first call (a stop string on rank 0), and that stop ends the call."""
    client = _client(api)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=4,
                                           parallel_tool_calls=False, temperature=0)
    stops = spooled_request(api, reply.id.removeprefix("chatcmpl-")).stop
    assert stops == ["</tool_call>"] and reply.choices[0].message.content
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=4,
                                           temperature=0, stop=["zz"])
    assert spooled_request(api, reply.id.removeprefix("chatcmpl-")).stop == ["zz"]
    # What a model that calls a tool writes, cut at the stop string, as rank 0 ends it.
    tokenizer = load_tokenizer(model)
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}\n'
    final = Final(finish_reason="stop", stop_sequence="</tool_call>", usage=Usage.of(10, 20))
    one_call = partial(ToolCallText, tokenizer, TOOLS, True)
    choice = ChatReply("r", 0, "tiny", tool_text=one_call).whole([Outcome(text, final, None)], final.usage).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Rome", "days": 3}
    streamed = ChatReply("r", 0, "tiny", tool_text=one_call)
    chunks = [json.loads(f.removeprefix("data: ")) for f in streamed.delta(0, text) + streamed.choice_end(0, final)]
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
    assert [[call["function"]["name"] for call in c] for c in calls] == [["get_weather"]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    message = MessageReply("r", "tiny", 10, one_call).whole(
        [Outcome(text, final, None)], final.usage)
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    assert [b.type for b in message.content] == ["tool_use"] and message.content[0].input == {"city": "Rome", "days": 3}


def test_tool_refusals(api: ApiServer, tmp_path: Path) -> None:
    client = _client(api)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=4,
                                       tool_choice="required", response_format={"type": "json_object"})
    assert err.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, tool_choice="required")
    assert err.value.body["param"] == "tool_choice" and "no tools" in err.value.body["message"]
    # A model whose template has no tools: refused before anything is queued.
    plain = make_tiny_model("llama", tmp_path / "llama")
    with ApiServer(ring_settings_for(plain, tmp_path / "spool", served_model_name="plain")) as other:
        with pytest.raises(openai.BadRequestError) as err:
            other.client().chat.completions.create(model="plain", messages=MESSAGES, tools=TOOLS, max_tokens=4)
    assert err.value.body["param"] == "tools" and "no tool calling" in err.value.body["message"]
