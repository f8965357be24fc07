"""Request fields beyond the basics, through real HTTP against a real rank 0: unknown
fields refused, penalties and logit_bias as mlx-lm applies them, sampling defaults from
the model's generation_config.json and from the settings, model aliases, CORS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from conftest import reference_tokens
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.utils import load_tokenizer
from harness import AUTH, ApiServer, RankProcess, error_body, ring_settings_for, spooled_request, ring_and_api

from models.tiny import make_tiny_model
from spool.protocol import SamplingParams

ALIASES = "tiny,tiny-alias"
ALLOWED = "http://allowed.example"
MESSAGES = [{"role": "user", "content": "Tell me about the harbour town of Wexley."}]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose generation_config.json recommends greedy decoding with top_p 0.9."""
    path = make_tiny_model("llama", tmp_path_factory.mktemp("model") / "llama")
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7,
                                                             "top_p": 0.9, "eos_token_id": 2}))
    return path


@pytest.fixture(scope="module")
def served(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, RankProcess]]:
    spool_dir = tmp_path_factory.mktemp("ring") / "spool"
    with ring_and_api(model, spool_dir, api_settings={"served_model_name": ALIASES, "cors_origins": ALLOWED}) as both:
        yield both


@pytest.fixture
def api(served: tuple[ApiServer, RankProcess]) -> ApiServer:
    return served[0]


def _prompt(model: Path) -> list[int]:
    return list(load_tokenizer(model).apply_chat_template(MESSAGES, add_generation_prompt=True))


@pytest.mark.parametrize("field", [{"presence_penalty": 0.5, "functions": []}, {"modalities": ["text"]},
                                   {"prediction": {"type": "content"}}, {"audio": {"voice": "x"}},
                                   {"stream_options": {"x": 1}}])
def test_unknown_fields_are_refused_naming_them(api: ApiServer, field: dict) -> None:
    name = next(k for k in field if k != "presence_penalty")
    response = api.post("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, **field})
    assert response.status_code == 400, response.text
    error = error_body(response)
    assert error["param"] in (name, f"{name}.x") and "not permitted" in error["message"], error


def test_fields_that_cannot_change_the_output_are_accepted(api: ApiServer) -> None:
    reply = api.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, user="u1",
                                                 metadata={"k": "v"}, store=False, safety_identifier="s1",
                                                 prompt_cache_key="k1", prompt_cache_retention="24h")
    assert reply.usage.completion_tokens == 2


def test_defaults_come_from_generation_config(api: ApiServer, model: Path) -> None:
    """No temperature in the request: the model's do_sample=false makes it greedy."""
    reply = api.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8)
    assert spooled_request(api, reply.id.removeprefix("chatcmpl-")).sampling == \
        SamplingParams(temperature=0.0, top_p=0.9)
    expected = load_tokenizer(model).decode(reference_tokens(model, _prompt(model), 8))
    assert reply.choices[0].message.content == expected


def test_settings_override_generation_config(served: tuple[ApiServer, RankProcess], model: Path) -> None:
    spool_dir = served[0].settings.spool_dir
    with ApiServer(ring_settings_for(model, spool_dir, default_temperature=0.3, default_top_k=5)) as api:
        reply = api.client().chat.completions.create(model=str(model), messages=MESSAGES, max_tokens=2, top_p=0.5)
        sent = spooled_request(api, reply.id.removeprefix("chatcmpl-"))
    # Sampling without a seed gets one drawn by the server, kept for a resume after a restart.
    assert sent.sampling.seed is not None
    assert sent.sampling.model_copy(update={"seed": None}) == SamplingParams(temperature=0.3, top_p=0.5, top_k=5)


@pytest.mark.parametrize("penalties", [{"presence_penalty": 1.5}, {"frequency_penalty": 2.0},
                                       {"presence_penalty": -2.0}, {"presence_penalty": 1.0, "frequency_penalty": 1.0}])
def test_penalties_match_mlx_lm(api: ApiServer, model: Path, penalties: dict) -> None:
    reply = api.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                                 **penalties)
    expected = reference_tokens(model, _prompt(model), 24, logits_processors=make_logits_processors(**penalties))
    assert reply.choices[0].message.content == load_tokenizer(model).decode(expected)
    assert expected != reference_tokens(model, _prompt(model), 24), "the penalty changes nothing here"


def test_logit_bias_forces_and_bans_tokens(api: ApiServer, model: Path) -> None:
    greedy = reference_tokens(model, _prompt(model), 6)
    forced = 300
    reply = api.post("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 6,
                                              "temperature": 0, "logit_bias": {str(forced): 100}}).json()
    token_ids = load_tokenizer(model).encode(reply["choices"][0]["message"]["content"], add_special_tokens=False)
    assert set(token_ids) == {forced}, token_ids
    banned = {str(token): -100 for token in set(greedy)}
    reply = api.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 logit_bias=banned)
    assert reply.usage.completion_tokens == 6
    assert not set(greedy) & set(reference_tokens(model, _prompt(model), 6, logits_processors=make_logits_processors(
        logit_bias={int(k): v for k, v in banned.items()})))
    for bad in ({"999999": 1}, {"5": 101}):
        with pytest.raises(openai.BadRequestError) as err:
            api.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, logit_bias=bad)
        assert err.value.body["param"] == "logit_bias"


def test_served_model_name_aliases(api: ApiServer) -> None:
    client = api.client()
    assert [m.id for m in client.models.list().data] == ALIASES.split(",")
    reply = client.chat.completions.create(model="tiny-alias", messages=MESSAGES, max_tokens=2)
    assert reply.model == "tiny-alias"
    assert spooled_request(api, reply.id.removeprefix("chatcmpl-")).model == "tiny"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="other", messages=MESSAGES, max_tokens=2)
    assert "'tiny', 'tiny-alias'" in err.value.body["message"]


def test_cors_preflight_and_request(api: ApiServer) -> None:
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(f"{api.url}/v1/chat/completions", headers={"Origin": ALLOWED, **preflight})
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in allowed.headers["access-control-allow-methods"]
    refused = httpx.options(f"{api.url}/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    response = httpx.get(f"{api.url}/v1/models", headers={"Origin": ALLOWED, **AUTH})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ALLOWED
    response = httpx.get(f"{api.url}/v1/models", headers={"Origin": "http://evil.example", **AUTH})
    assert "access-control-allow-origin" not in response.headers
