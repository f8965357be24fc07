"""Anthropic's Messages API through the official `anthropic` client, against a real rank 0
on the tiny model: text replies equal mlx-lm's greedy output, streamed and not, with
Anthropic's usage, stop reasons, token counts and error envelope."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import anthropic
import httpx
import pytest
from test_api import KEY, ApiServer, _mlx_lm_greedy, ring_and_api


SYSTEM = "Be brief."
MESSAGES = [{"role": "user", "content": "Tell me about the harbour town of Wexley."}]
CHAT = [{"role": "system", "content": SYSTEM}, *MESSAGES]


@pytest.fixture(scope="module")
def model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def api(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    spool_dir = tmp_path_factory.mktemp("ring") / "spool"
    # Anthropic's current client sends no sampling fields: greedy is the operator's default here.
    with ring_and_api(model, spool_dir, api_settings={"served_model_name": "tiny", "default_temperature": 0.0}
                      ) as (server, _):
        yield server


def _client(api: ApiServer, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api.url, api_key=key, max_retries=0)


def test_messages_create_matches_mlx_lm(api: ApiServer, model: Path) -> None:
    reference = _mlx_lm_greedy(model, CHAT, 12)
    message = _client(api).messages.create(model="tiny", system=SYSTEM, messages=MESSAGES, max_tokens=12)
    assert message.type == "message" and message.role == "assistant" and message.model == "tiny"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == reference.text
    assert message.stop_reason == ("max_tokens" if reference.finish_reason == "length" else "end_turn")
    assert message.usage.output_tokens == len(reference.token_ids)
    count = _client(api).messages.count_tokens(model="tiny", system=SYSTEM, messages=MESSAGES)
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) == count.input_tokens


def test_messages_stream_matches_mlx_lm(api: ApiServer, model: Path) -> None:
    reference = _mlx_lm_greedy(model, CHAT, 12)
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
    reference = _mlx_lm_greedy(model, CHAT, 12)
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
