"""Structured outputs through real HTTP against real ranks: `response_format` json_object
and json_schema are enforced by constrained decoding on rank 0 (llguidance), so the
output parses and validates whatever the model; free-text requests beside them are
unchanged (greedy output equals mlx-lm's)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from harness import ApiServer, mlx_lm_greedy, ring_and_api

from models.tiny import make_tiny_model

MESSAGES = [{"role": "user", "content": "Describe the harbour town of Wexley as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["port", "village", "city"]},
        "ships": {"type": "integer", "minimum": 0, "maximum": 999},
        "open": {"type": "boolean"},
        "harbour": {
            "type": "object",
            "properties": {"piers": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "minItems": 1, "maxItems": 3}},
            "required": ["piers"], "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "ships", "open", "harbour"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "town", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("model") / "qwen3")


@pytest.fixture(scope="module")
def api(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The API over two ranks (MPI): tokens come back from the last rank to rank 0, which
    masks the logits with each sequence's grammar before it samples."""
    spool_dir = tmp_path_factory.mktemp("ring") / "spool"
    with ring_and_api(model, spool_dir, ranks=2, api_settings={"served_model_name": "tiny"}) as (server, _):
        yield server


def _create(api: ApiServer, seed: int, **extra):
    return api.client(timeout=120).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=120,
                                                           temperature=1.0, seed=seed, **extra)


def test_json_schema_output_always_validates(api: ApiServer) -> None:
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda seed: _create(api, seed, response_format=FORMAT), range(8)))
    for reply in replies:
        assert reply.choices[0].finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    assert len({r.choices[0].message.content for r in replies}) > 1, "sampling made no difference"


def test_json_object_and_streaming(api: ApiServer) -> None:
    reply = _create(api, 1, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    chunks = list(_create(api, 2, response_format=FORMAT, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_free_text_beside_constrained_requests_is_unchanged(api: ApiServer, model: Path) -> None:
    reference = mlx_lm_greedy(model, MESSAGES, 24)
    with ThreadPoolExecutor(3) as pool:
        constrained = [pool.submit(_create, api, seed, response_format=FORMAT) for seed in (5, 6)]
        free = api.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    assert free.choices[0].message.content == reference.text
    for future in constrained:
        jsonschema.validate(json.loads(future.result().choices[0].message.content), SCHEMA)


@pytest.mark.parametrize(("response_format", "param"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema"}, "response_format"),
    ({"type": "xml"}, "response_format.type"),
])
def test_a_schema_that_cannot_be_enforced_is_400(api: ApiServer, response_format: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        api.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4,
                                             response_format=response_format)
    assert err.value.body["param"] == param, err.value.body


class City(BaseModel):
    name: str = Field(max_length=24)
    country: Literal["France", "Germany", "Italy", "Spain", "Portugal"]
    population_millions: int = Field(ge=0, le=50)


def test_parse_with_a_pydantic_model_on_the_default_model(default_model: Path, tmp_path: Path) -> None:
    """The official client's `parse`, 20 times in a row on the real default model."""
    with ring_and_api(default_model, tmp_path / "spool", api_settings={"served_model_name": "smol"}) as (api, _):
        client = api.client(timeout=120)
        started = time.monotonic()
        for seed in range(20):
            reply = client.chat.completions.parse(
                model="smol", response_format=City, max_tokens=60, temperature=0.7, seed=seed,
                messages=[{"role": "user", "content": "Name a large European city, as JSON."}])
            assert isinstance(reply.choices[0].message.parsed, City), reply
        print(f"20 parsed replies in {time.monotonic() - started:.1f} s")
