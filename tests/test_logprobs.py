"""Log-probabilities through the official `openai` client against a real rank 0: they are
mlx-lm's log-probabilities of the returned tokens (generate_step's, on the same model),
in OpenAI's shapes for chat and text completions, streamed and not."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import mlx.core as mx
import openai
import pytest
from mlx_lm.generate import generate_step
from harness import ApiServer, load_reference, tiny_api


MESSAGES = [{"role": "user", "content": "Tell me about the harbour town of Wexley."}]
TOKENS = 10


@pytest.fixture(scope="module")
def model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def api(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with tiny_api(model, tmp_path_factory) as server:
        yield server


def _reference(model: Path, prompt: list[int]) -> list[tuple[int, mx.array]]:
    """mlx-lm's greedy tokens, each with its log-probability vector."""
    mlx_model, _ = load_reference(model)
    steps = generate_step(mx.array(prompt), mlx_model, max_tokens=TOKENS)
    return [(token, logprobs) for token, logprobs in steps]


def test_chat_logprobs_are_mlx_lms(api: ApiServer, model: Path) -> None:
    _, tokenizer = load_reference(model)
    reference = _reference(model, tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))
    reply = api.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=TOKENS,
                                                 temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([t]) for t, _ in reference]
    for item, (token, logprobs) in zip(content, reference):
        assert item.logprob == pytest.approx(logprobs[token].item(), abs=1e-4)
        assert item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].token == item.token  # greedy: the likeliest
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
    streamed = list(api.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=TOKENS,
                                                         temperature=0, logprobs=True, stream=True))
    tokens = [c.token for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for c in chunk.choices[0].logprobs.content]
    assert tokens == [c.token for c in content]
    plain = api.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_shape(api: ApiServer, model: Path) -> None:
    _, tokenizer = load_reference(model)
    reference = _reference(model, tokenizer.encode("The harbour"))
    reply = api.client().completions.create(model="tiny", prompt="The harbour", max_tokens=TOKENS, temperature=0,
                                            logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t, _ in reference]
    assert logprobs.token_logprobs == pytest.approx([lp[t].item() for t, lp in reference], abs=1e-4)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]


@pytest.mark.parametrize("extra", [{"top_logprobs": 3}, {"logprobs": True, "top_logprobs": 21}])
def test_bad_logprobs_fields_are_400(api: ApiServer, extra: dict) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        api.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **extra)
    assert err.value.body["type"] == "invalid_request_error"
