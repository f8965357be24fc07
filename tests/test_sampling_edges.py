"""Every sampling field at its edges, through the official client against a real rank:
each request gets a 400 in OpenAI's envelope naming the field, or an answer; either
way the ring stays healthy and the next ordinary request is served."""

from __future__ import annotations

from typing import Iterator

import httpx
import openai
import pytest
from harness import ApiServer, ring_and_api

from models.tiny import VOCAB_SIZE, make_tiny_model

ANSWERED, REFUSED, TOO_LARGE = "answered", "refused", "too large"  # 200, 400, 413

EDGES = [
    ({"top_k": 0}, ANSWERED), ({"top_k": 1}, ANSWERED), ({"top_k": VOCAB_SIZE - 1}, ANSWERED),
    ({"top_k": VOCAB_SIZE}, REFUSED), ({"top_k": 10**6}, REFUSED), ({"top_k": -1}, REFUSED),
    ({"top_p": 1e-300}, ANSWERED), ({"top_p": 1.0}, ANSWERED), ({"top_p": 0}, REFUSED), ({"top_p": 1.5}, REFUSED),
    ({"min_p": 1e-300}, ANSWERED), ({"min_p": 1.0}, ANSWERED), ({"min_p": -0.1}, REFUSED),
    ({"temperature": 1e-300}, ANSWERED), ({"temperature": 2.0}, ANSWERED), ({"temperature": 2.5}, REFUSED),
    ({"repetition_penalty": 1e-300}, ANSWERED), ({"repetition_penalty": 1e300}, ANSWERED),
    ({"repetition_penalty": 0}, REFUSED),
    ({"presence_penalty": 2.0}, ANSWERED), ({"presence_penalty": -2.0}, ANSWERED),
    ({"presence_penalty": 1e300}, REFUSED),
    ({"frequency_penalty": 2.0}, ANSWERED), ({"frequency_penalty": -2.0}, ANSWERED),
    ({"frequency_penalty": -1e300}, REFUSED),
    ({"seed": 2**64 + 1}, ANSWERED), ({"seed": -(2**70)}, ANSWERED), ({"seed": 0}, ANSWERED),
    ({"stop": []}, ANSWERED), ({"stop": ["x"] * 4}, ANSWERED), ({"stop": ["x"] * 100}, REFUSED),
    ({"stop": ["y" * 1000]}, ANSWERED), ({"stop": ["y" * 100_000]}, TOO_LARGE), ({"stop": [""]}, REFUSED),
    ({"logit_bias": {"5": 100}}, ANSWERED), ({"logit_bias": {"5": -100}}, ANSWERED),
    ({"logit_bias": {"5": 1e300}}, REFUSED), ({"logit_bias": {str(VOCAB_SIZE): 1}}, REFUSED),
    ({"max_tokens": 0}, REFUSED), ({"max_tokens": 10**12}, REFUSED),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    model = make_tiny_model("llama", tmp_path_factory.mktemp("model") / "llama")
    with ring_and_api(model, tmp_path_factory.mktemp("ring") / "spool") as (api, _):
        yield api


@pytest.mark.parametrize("fields,outcome", EDGES, ids=lambda value: str(value)[:40])
def test_sampling_field_at_its_edge(served: ApiServer, fields: dict, outcome: str) -> None:
    client, model = served.client(), served.settings.model_repo
    body = {"max_tokens": 3} | fields
    request = {name: body.pop(name) for name in ("max_tokens", "stop", "seed", "temperature", "top_p",
                                                 "presence_penalty", "frequency_penalty", "logit_bias")
               if name in body}
    if outcome == TOO_LARGE:  # MAX_REQUEST_BYTES, before anything parses the body
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model=model, prompt="edges", extra_body=body, **request)
        assert refused.value.status_code == 413 and "MAX_REQUEST_BYTES" in str(refused.value.body), refused.value
    elif outcome == REFUSED:
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=model, prompt="edges", extra_body=body, **request)
        error = refused.value.body
        assert error["type"] == "invalid_request_error" and error["param"], error
        # A budget past the context is OpenAI's context_length_exceeded, on the prompt.
        named = set(fields) | ({"prompt"} if "max_tokens" in fields else set())
        assert error["param"].split(".")[0].split("[")[0] in named, error
    else:
        reply = client.completions.create(model=model, prompt="edges", extra_body=body, **request)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200
    after = client.completions.create(model=model, prompt="after", max_tokens=2, temperature=0)
    assert after.usage.completion_tokens >= 1
