"""What KV_CACHE_RESERVED_MEMORY_MB reserves per sequence is what the model's caches take.

In process: each model's footprint, measured as every rank does at start, against the
bytes of the caches mlx-lm itself makes running the same model one token at a time.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes

from distributed.anatomy import discover
from distributed.kv_cache import KVSettings
from distributed.shard import NO_HOPS, Stage, prune_to_stage
from distributed.stage_checks import measure_footprint
from models.tiny import shared_config

LENGTHS = (1, 100, 300)  # within one allocation, and past it


def _model(model_type: str):
    config = shared_config(model_type)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def _mlx_lm_bytes(model, tokens: int) -> int:
    cache = make_prompt_cache(model)
    for t in range(tokens):
        model(mx.array([[t % 100]]), cache=cache)
        mx.eval([c.state for c in cache])
    return sum(c.nbytes for c in cache)


@pytest.mark.parametrize("model_type", [
    "llama",  # plain KV
    "deepseek_v3",  # latent attention: keys and values of different sizes (was counted 1.8x)
    "gpt_oss",  # sliding-window layers beside full ones
    "qwen3_next",  # recurrent state beside attention
    "falcon_h1",  # a list of caches per layer
])
def test_footprint_is_the_bytes_mlx_lm_caches_take(model_type):
    model = _model(model_type)
    stage = copy.deepcopy(model)
    prune_to_stage(stage, discover(stage), Stage(0, 1, 0, len(model.layers)), NO_HOPS)
    footprint = measure_footprint(stage, 0, len(model.layers), KVSettings())
    for tokens in LENGTHS:
        assert footprint.bytes_for(tokens) == _mlx_lm_bytes(model, tokens), tokens


def test_chunked_attention_is_bounded_by_its_chunk():
    """llama4 keeps a chunk of tokens (and an allocation) in its chunked layers: reserved at
    that most from the first token, so never less than they take."""
    model = _model("llama4")
    stage = copy.deepcopy(model)
    prune_to_stage(stage, discover(stage), Stage(0, 1, 0, len(model.layers)), NO_HOPS)
    footprint = measure_footprint(stage, 0, len(model.layers), KVSettings())
    assert footprint.fixed > 0
    for tokens in LENGTHS:
        assert footprint.bytes_for(tokens) >= _mlx_lm_bytes(model, tokens)
