"""`n` > 1 through the official `openai` client against a real rank 0 on the tiny model:
n choices, each drawn with its own seed derived from the request's (so a seeded request
is reproducible), streamed and not; the copies start from one prefill of the prompt,
kept in the prompt cache; usage sums the choices' tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from harness import ApiServer, metric_value, mlx_lm_greedy, tiny_api


TOKENS = 8


def _messages(topic: str) -> list[dict]:
    # Each test its own prompt, so what the prompt cache holds from another test does not count.
    return [{"role": "user", "content": f"Tell me about {topic}."}]


@pytest.fixture(scope="module")
def model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def api(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with tiny_api(model, tmp_path_factory) as server:
        yield server


def _client(api: ApiServer) -> openai.OpenAI:
    return api.client(timeout=120)


def test_seeded_choices_are_reproducible(api: ApiServer) -> None:
    messages = _messages("the harbour town of Wexley")
    reused_before = metric_value(httpx.get(f"{api.url}/metrics").text, "mlx_ring_prompt_cache_reused_tokens_total")

    def draw(n: int) -> openai.types.chat.ChatCompletion:
        return _client(api).chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS, n=n,
                                                    temperature=1.0, seed=11)

    first, again = draw(3), draw(3)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) == 3, texts  # each copy its own seed
    assert draw(1).choices[0].message.content == texts[0]  # the first copy draws with the request's seed
    assert all(c.finish_reason == "length" for c in first.choices)
    usage = first.usage
    assert usage.completion_tokens == 3 * TOKENS and usage.total_tokens == usage.prompt_tokens + 3 * TOKENS
    # One prefill for all: every copy took all of the prompt but its last token from the cache.
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    reused = metric_value(httpx.get(f"{api.url}/metrics").text, "mlx_ring_prompt_cache_reused_tokens_total")
    # The first request's three copies reused the first prefill's prompt: (n) x (prompt - 1) at the least.
    assert reused - reused_before >= 3 * (usage.prompt_tokens - 1)


def test_greedy_choices_are_all_mlx_lms(api: ApiServer, model: Path) -> None:
    messages = _messages("the lighthouse of Brume")
    reference = mlx_lm_greedy(model, messages, TOKENS)
    reply = _client(api).chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS, n=4,
                                                 temperature=0)
    assert [c.message.content for c in reply.choices] == [reference.text] * 4


def test_streamed_choices_assemble(api: ApiServer) -> None:
    messages = _messages("the salt marshes of Oddby")
    whole = _client(api).chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS, n=2,
                                                 temperature=1.0, seed=5)
    chunks = list(_client(api).chat.completions.create(
        model="tiny", messages=messages, max_tokens=TOKENS, n=2, temperature=1.0, seed=5, stream=True,
        stream_options={"include_usage": True}))
    texts, finishes = ["", ""], [None, None]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices] and texts[0] != texts[1]
    assert finishes == ["length", "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2 * TOKENS


def test_completions_with_logprobs(api: ApiServer) -> None:
    client = _client(api)
    reply = client.completions.create(model="tiny", prompt="The ferry to Skarn", max_tokens=TOKENS, n=2,
                                      temperature=1.0, seed=9, logprobs=2)
    assert [c.index for c in reply.choices] == [0, 1] and reply.choices[0].text != reply.choices[1].text
    for choice in reply.choices:
        assert "".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.token_logprobs) == TOKENS
    streamed = ["", ""]
    for chunk in client.completions.create(model="tiny", prompt="The ferry to Skarn", max_tokens=TOKENS, n=2,
                                           temperature=1.0, seed=9, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in reply.choices]


def test_choices_follow_a_schema(api: ApiServer) -> None:
    schema = {"type": "object", "properties": {"port": {"enum": ["Wexley", "Brume"]}}, "required": ["port"],
              "additionalProperties": False}
    reply = _client(api).chat.completions.create(
        model="tiny", messages=_messages("a port"), max_tokens=40, n=3, temperature=1.0, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "port", "schema": schema}})
    for choice in reply.choices:
        assert json.loads(choice.message.content)["port"] in ("Wexley", "Brume"), choice


def test_too_many_choices_are_refused(api: ApiServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _client(api).chat.completions.create(model="tiny", messages=_messages("x"), max_tokens=2, n=17)
    assert err.value.body["param"] == "n" and "16" in err.value.body["message"]
