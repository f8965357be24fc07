"""KV caches for one stage's layers, from mlx-lm's cache classes."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache, trim_prompt_cache

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


def _batched(cache: Any) -> bool:
    return hasattr(cache, "extend")


def _as_batch(cache: Any) -> Any:
    """A batch cache of one row from a sequence's own cache; batch caches as they are."""
    return cache if _batched(cache) else cache.merge([cache])


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

    def __init__(
        self, model: nn.Module, start: int, end: int, kv: KVSettings, local: Optional[list] = None
    ):
        caches = make_model_cache(model, kv)
        self.kv = kv
        self.local = caches[start:end] if local is None else local
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

    def join(self, other: "StageCache") -> None:
        """Append the sequences of `other` as new batch rows (mlx-lm's batch caches)."""
        if not _batched(self.local[0]) and not _batched(other.local[0]):
            self.local = [mine.merge([mine, theirs]) for mine, theirs in zip(self.local, other.local)]
            return
        self.local = [_as_batch(c) for c in self.local]
        for mine, theirs in zip(self.local, other.local):
            mine.extend(_as_batch(theirs))

    def prepare(self, lengths: list[int], right_padding: list[int]) -> None:
        """Before prompts of `lengths` tokens, right-padded to one length, go through
        together (mlx-lm's batch caches); `finalize` moves the padding to the left."""
        for c in self.local:
            c.prepare(lengths=lengths, right_padding=right_padding)

    def finalize(self) -> None:
        """After a padded prefill (a no-op otherwise): ready to decode."""
        for c in self.local:
            if hasattr(c, "finalize"):
                c.finalize()

    def keep(self, rows: list[int]) -> None:
        """Drop every batch row not in `rows`."""
        for c in self.local:
            c.filter(rows)

    def row(self, index: int) -> list:
        """A copy of one sequence's caches, unbatched, computed now: a batch row left lazy
        would keep the whole batch's arrays alive, and through the filters of the rows
        that leave after it, restoring it would copy them again and again."""
        if not hasattr(self.local[0], "extract"):
            return copy.deepcopy(self.local)
        caches = [c.extract(index) for c in self.local]
        mx.eval([c.state for c in caches])
        return caches

    @property
    def state(self) -> list:
        return [c.state for c in self.local]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.local)


def can_batch(model: nn.Module, kv: KVSettings) -> bool:
    """Whether sequences can share batch caches: mlx-lm has no batched quantized cache."""
    return kv.bits is None and all(hasattr(c, "merge") for c in make_model_cache(model, kv))


def can_reuse_prefixes(model: nn.Module, kv: KVSettings) -> bool:
    """Whether a cache may be cut back to any prefix: only plain KV caches always can."""
    return kv.bits is None and all(type(c) is KVCache for c in make_model_cache(model, kv))


def restore(caches: list, tokens: int) -> list:
    """A copy of stored `caches` cut back to their first `tokens` tokens."""
    restored = copy.deepcopy(caches)
    trim_prompt_cache(restored, restored[0].offset - tokens)
    return restored


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


def token_capacity(budget_bytes: int, per_token: int) -> int:
    """KV tokens that fit in `budget_bytes`, all active sequences together."""
    return budget_bytes // max(per_token, 1)


def tokens_reserved(tokens: int, kv: KVSettings) -> int:
    """KV tokens to reserve for a sequence that may reach `tokens`: caches grow in
    whole allocation steps, and a rotating window never holds more than its size."""
    if kv.max_size is not None:
        tokens = min(tokens, kv.max_size)
    return -(-tokens // ALLOCATION_STEP) * ALLOCATION_STEP
