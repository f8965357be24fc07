"""KV caches for one stage's layers, from mlx-lm's cache classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

# Tokens a KVCache allocates at a time: room it may hold beyond what is used.
ALLOCATION_STEP = KVCache.step


@dataclass(frozen=True)
class KVSettings:
    """The cache settings from `.env`."""

    max_size: Optional[int] = None
    bits: Optional[int] = None
    group_size: int = 64
    quantized_start: int = 5000


def _kind(cache: Any) -> tuple:
    return type(cache).__name__, getattr(cache, "max_size", None), getattr(cache, "keep", None)


def make_model_cache(model: nn.Module, kv: KVSettings) -> list:
    """One cache per model layer: the model's own choice, with full-attention
    layers bounded to a rotating window of `kv.max_size` tokens when set."""
    caches = make_prompt_cache(model, max_kv_size=kv.max_size)
    if kv.max_size is None:
        return caches
    return [
        RotatingKVCache(max_size=kv.max_size, keep=4) if type(c) is KVCache else c for c in caches
    ]


class StageCache:
    """One sequence's caches for layers [start, end), and the full-length list
    the model's forward pass reads.

    The forward pass builds attention masks from the cache of some layer, which
    may be held by another rank. That slot points at a local cache of the same
    kind: all layers of a kind see the same tokens, so the mask comes out right.
    """

    def __init__(self, model: nn.Module, start: int, end: int, kv: KVSettings):
        caches = make_model_cache(model, kv)
        self.kv = kv
        self.local = caches[start:end]
        by_kind = {}
        for i, c in enumerate(self.local):
            by_kind.setdefault(_kind(c), i)
        self.slots: list[Any] = [by_kind.get(_kind(c), c) for c in caches]
        for i in range(start, end):
            self.slots[i] = i - start

    def view(self) -> list:
        """The cache list to pass as the model's `cache` argument."""
        return [self.local[s] if isinstance(s, int) else s for s in self.slots]

    def maybe_quantize(self) -> None:
        """Switch full-size caches to quantized ones past QUANTIZED_KV_START tokens."""
        if self.kv.bits is None:
            return
        for i, c in enumerate(self.local):
            if type(c) is KVCache and c.offset >= self.kv.quantized_start:
                self.local[i] = c.to_quantized(group_size=self.kv.group_size, bits=self.kv.bits)

    @property
    def state(self) -> list:
        return [c.state for c in self.local]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.local)


def kv_bytes_per_token(layers: list[nn.Module], hidden_size: int, dtype: mx.Dtype) -> int:
    """Bytes one token adds to the caches of `layers`, read off the shapes of a
    one-token forward pass (built, never evaluated)."""
    total = 0
    h = mx.zeros((1, 1, hidden_size), dtype=dtype)
    for layer in layers:
        cache = KVCache()
        layer(h, None, cache)
        # Keys and values alike; the allocation holds `shape[2]` token slots.
        total += 2 * cache.keys.nbytes // cache.keys.shape[2]
    return total


def token_capacity(budget_bytes: int, per_token: int, kv: KVSettings) -> Optional[int]:
    """Most tokens one sequence may reach within `budget_bytes` of KV cache;
    None when a rotating window always fits."""
    slots = budget_bytes // max(per_token, 1) - ALLOCATION_STEP
    if kv.max_size is not None and kv.max_size <= slots:
        return None
    return max(slots, 0)
