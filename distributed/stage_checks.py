"""What a stage's caches cost and what the model can do with them, measured at start.

Each check runs the stage on its own, off the ring (its hops handing it its own input
or noise, never reaching a neighbour), on the caches the model really makes: their
bytes after a one-token step (`measure_footprint`), a step on quantized caches
(`check_kv_bits`), and rows of a batch against the same sequences alone
(`check_batching`). Every rank runs them; the ring agrees on the outcome at start.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import CacheList

from distributed.kv_cache import ALLOCATION_STEP, KVFootprint, KVSettings, StageCache, batching_refusal
from distributed.shard import NO_HOPS, Hops, attach_hops

# Two prompts of different lengths, so that a batch of them is padded, then one token.
BATCH_PROMPTS = ([3, 1, 4, 1, 5], [9, 2, 6])
BATCH_STEP = 7
TOLERANCE = 1e-3  # a batch may round differently; a broken mask is far off


def _account(cache: Any, found: dict) -> None:
    """Add one cache's bytes, after a one-token step, to `found`."""
    if isinstance(cache, CacheList):
        for c in cache.caches:
            _account(c, found)
        return
    keys, values = getattr(cache, "keys", None), getattr(cache, "values", None)
    if not isinstance(keys, mx.array):
        found["fixed"] += sum(a.nbytes for _, a in tree_flatten(cache.state) if isinstance(a, mx.array))
        return
    # Keys and values each hold `shape[2]` token slots; MLA's differ in size.
    per_token = keys.nbytes // keys.shape[2] + (values.nbytes // values.shape[2] if values is not None else 0)
    window = getattr(cache, "max_size", None)
    if getattr(cache, "chunk_size", None) is not None:
        # A chunked cache trims back to its chunk and then allocates a step again, so it
        # may hold both from the first token on: counted at that, its most.
        found["fixed"] += per_token * (cache.chunk_size + ALLOCATION_STEP)
    elif window is None:
        found["per_token"] += per_token
    else:
        found["windows"][window] = found["windows"].get(window, 0) + per_token


def measure_footprint(model: nn.Module, start: int, end: int, kv: KVSettings) -> KVFootprint:
    """The footprint of layers [start, end)'s caches, read off the caches the model
    makes after a one-token step of the stage (built, never evaluated)."""
    cache = StageCache(model, start, end, kv)
    model(mx.zeros((1, 1), dtype=mx.int32), cache=cache.view())
    found = {"per_token": 0, "windows": {}, "fixed": 0}
    for c in cache.local[: cache.layers]:
        _account(c, found)
    return KVFootprint(found["per_token"], tuple(sorted(found["windows"].items())), found["fixed"])


def check_kv_bits(model: nn.Module, start: int, end: int, kv: KVSettings) -> Optional[str]:
    """Why the stage cannot use KV_BITS, or None: a one-token step on quantized caches,
    evaluated (the stage's hops must not reach the ring)."""
    if kv.bits is None:
        return None
    cache = StageCache(model, start, end, kv)
    step = mx.zeros((1, 1), dtype=mx.int32)
    try:
        mx.eval(model(step, cache=cache.view()))
        cache.quantize()
        mx.eval(model(step, cache=cache.view()))
    except Exception as err:  # raised inside the model's attention, whatever it is
        return f"{type(err).__name__}: {err}"
    return None


def _noise(like: mx.array) -> mx.array:
    """A later stage's input for `check_batching`: the same for every row, by position;
    the embedding's zeros would make every cached value alike and hide a bad mask."""
    _, tokens, *rest = like.shape
    noise = mx.random.normal((1, tokens, *rest), key=mx.random.key(tokens))
    return mx.broadcast_to(noise, like.shape).astype(like.dtype)


def check_batching(model: nn.Module, start: int, end: int, kv: KVSettings) -> Optional[str]:
    """Why a batch's rows would not compute what each sequence computes alone, or None.
    As a decode group does: two prompts prefilled alone, then one step each alone and
    one as a batch of the two, merged (and left-padded) by mlx-lm's batch caches. Some
    of mlx-lm's models build masks a batch does not fit (gemma2)."""
    if batching_refusal(model, kv) is not None:
        return None  # off already
    attach_hops(model, Hops(_noise, lambda x: x))
    try:
        caches = []
        for prompt in BATCH_PROMPTS:
            cache = StageCache(model, start, end, kv)
            mx.eval(model(mx.array([prompt]), cache=cache.view()))
            caches.append(cache)
        step = mx.array([[BATCH_STEP]])
        alone = [model(step, cache=StageCache(model, start, end, kv, c.row(0)).view()) for c in caches]
        caches[0].join(caches[1])
        together = model(mx.concatenate([step] * len(caches)), cache=caches[0].view())
        same = [mx.allclose(together[i : i + 1], a, rtol=TOLERANCE, atol=TOLERANCE).item() for i, a in enumerate(alone)]
    except Exception as err:  # raised inside the model's masks or attention
        return f"a batch of two fails in the model ({type(err).__name__}: {err})"
    finally:
        attach_hops(model, NO_HOPS)
    if not all(same):
        return "a batch of two computes other values than each sequence alone (the model's masks do not fit a batch)"
    return None
