"""KV caches for one stage's layers, from mlx-lm's cache classes, and what they cost.

Whatever caches the model makes (plain and rotating KV, MLA's latent cache, SSM
state, lists of caches per layer) are used as they are; what the ring needs of
them (batching, reuse of a prefix, their bytes) is read off the caches themselves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import CacheList, KVCache, RotatingKVCache, make_prompt_cache, trim_prompt_cache

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
    inner = tuple(_kind(c) for c in cache.caches) if isinstance(cache, CacheList) else ()
    return type(cache).__name__, getattr(cache, "max_size", None), getattr(cache, "keep", None), inner


def _batched(cache: Any) -> bool:
    """Whether `cache` holds rows of a batch (mlx-lm's Batch* caches; ArraysCache is both)."""
    inner = cache.caches if isinstance(cache, CacheList) else ()
    return hasattr(cache, "extend") and all(_batched(c) for c in inner)


def _as_batch(cache: Any) -> Any:
    """A batch cache of one row from a sequence's own cache; batch caches as they are."""
    return cache if _batched(cache) else cache.merge([cache])


def _mergeable(cache: Any) -> bool:
    inner = cache.caches if isinstance(cache, CacheList) else ()
    return hasattr(cache, "merge") and all(_mergeable(c) for c in inner)


def _prefix_trimmable(cache: Any) -> bool:
    """Whether `cache` can always be cut back to any prefix: plain KV caches can; a
    window, a chunk or a recurrent state has forgotten what came before."""
    if isinstance(cache, CacheList):
        return all(_prefix_trimmable(c) for c in cache.caches)
    return type(cache) is KVCache


def make_model_cache(model: nn.Module, kv: KVSettings) -> list:
    """One cache per model layer: the model's own choice, with full-attention
    layers bounded to a rotating window of `kv.max_size` tokens when set."""
    caches = make_prompt_cache(model, max_kv_size=kv.max_size)
    if kv.max_size is None:
        return caches
    return [
        RotatingKVCache(max_size=kv.max_size, keep=4) if type(c) is KVCache else c for c in caches
    ]


class Shadow:
    """In a stage's cache list, a cache of a kind none of the stage's layers has. Model
    code may read such a cache outside the layers (bailing's linear layers take their
    positions from the attention cache's offset), so the layers the stage skips keep it
    in step (`advance`) with tokens of no size; the proxy is new for each step."""

    def __init__(self, cache: Any):
        self.cache = cache
        self.advanced = False

    @property
    def __class__(self):  # type checks in model code see the cache's own kind
        return type(self.cache)

    def __getattr__(self, key: str) -> Any:
        return getattr(self.cache, key)

    def __getitem__(self, index: int) -> Any:  # a CacheList's parts
        return self.cache[index]

    def advance(self, x: mx.array) -> None:
        """Once a step: the cache takes the step's `x.shape[1]` tokens, and computes them
        in the background (nothing else would, and lazy updates would pile up)."""
        if not self.advanced:
            self.advanced = True
            _advance(self.cache, x.shape[0], x.shape[1])
            mx.async_eval([a for _, a in tree_flatten(self.cache.state) if isinstance(a, mx.array)])


def _advance(cache: Any, rows: int, tokens: int) -> None:
    if isinstance(cache, CacheList):
        for c in cache.caches:
            _advance(c, rows, tokens)
    else:
        empty = mx.zeros((rows, 1, tokens, 1))
        cache.update_and_fetch(empty, empty)


def _counts_tokens(cache: Any) -> bool:
    """Whether a cache keeps a token count (an offset) that code outside the layers may
    read; a recurrent state does not, and a shadow of it would be a batch of nothing."""
    if isinstance(cache, CacheList):
        return all(_counts_tokens(c) for c in cache.caches)
    return hasattr(cache, "update_and_fetch")


class StageCache:
    """One sequence's caches for layers [start, end), and the full-length list
    the model's forward pass reads.

    The forward pass builds attention masks from the cache of some layer, which
    may be held by another rank. That slot points at a local cache of the same
    kind: all layers of a kind see the same tokens, so the mask comes out right.
    For a kind no local layer has that counts tokens, one `Shadow` cache stands in
    (after the layers' own in `local`); for others, a cache no step touches. `local` given: stored caches, shadows included, to start from.
    """

    def __init__(
        self, model: nn.Module, start: int, end: int, kv: KVSettings, local: Optional[list] = None
    ):
        caches = make_model_cache(model, kv)
        self.kv = kv
        self.layers = end - start
        held = caches[start:end]
        by_kind: dict[tuple, int] = {}
        for i, c in enumerate(held):
            by_kind.setdefault(_kind(c), i)
        self.slots: list[Any] = []  # an index into `local`, or a cache no step touches
        for i, c in enumerate(caches):
            if not start <= i < end and _kind(c) not in by_kind and _counts_tokens(c):
                by_kind[_kind(c)] = len(held)
                held.append(c)
            self.slots.append(i - start if start <= i < end else by_kind.get(_kind(c), c))
        self.local = held if local is None else local

    def view(self) -> list:
        """The cache list to pass as the model's `cache` argument."""
        held = {s for s in self.slots if isinstance(s, int)}
        shadows = {s: Shadow(self.local[s]) for s in held if s >= self.layers}
        return [shadows.get(s) or self.local[s] if isinstance(s, int) else s for s in self.slots]

    def maybe_quantize(self) -> None:
        """Switch full-size caches to quantized ones past QUANTIZED_KV_START tokens."""
        if self.kv.bits is not None:
            self.quantize(self.kv.quantized_start)

    def quantize(self, from_tokens: int = 0) -> None:
        for i, c in enumerate(self.local[: self.layers]):
            if type(c) is KVCache and c.offset >= from_tokens:
                self.local[i] = c.to_quantized(group_size=self.kv.group_size, bits=self.kv.bits)

    def join(self, other: "StageCache") -> None:
        """Append the sequences of `other` as new batch rows (mlx-lm's batch caches)."""
        joined = []
        for mine, theirs in zip(self.local, other.local):
            if not _batched(mine) and not _batched(theirs):
                joined.append(mine.merge([mine, theirs]))
            else:
                mine = _as_batch(mine)
                mine.extend(_as_batch(theirs))
                joined.append(mine)
        self.local = joined

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

    def trim(self, tokens: int) -> None:
        """Forget the last `tokens` tokens of every cache (mlx-lm's trim): the next
        step writes over them. Only for caches `prefix_refusal` accepts."""
        if tokens and trim_prompt_cache(self.local, tokens) != tokens:
            raise RuntimeError(f"the stage's caches could not forget their last {tokens} tokens")

    def keep(self, rows: list[int]) -> None:
        """Drop every batch row not in `rows`."""
        for c in self.local:
            c.filter(rows)

    def row(self, index: int) -> list:
        """A copy of one sequence's caches, unbatched, computed now: a batch row left lazy
        would keep the whole batch's arrays alive, and through the filters of the rows
        that leave after it, restoring it would copy them again and again."""
        caches = [c.extract(index) if _batched(c) else copy.deepcopy(c) for c in self.local]
        mx.eval([c.state for c in caches])
        return caches

    @property
    def state(self) -> list:
        return [c.state for c in self.local]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.local)


def batching_refusal(model: nn.Module, kv: KVSettings) -> Optional[str]:
    """Why sequences cannot share batch caches, or None when they can: the caches'
    kinds, or what a check at start found (`refuse_batching`)."""
    if kv.bits is not None:
        return "KV_BITS is set, and mlx-lm has no batched quantized cache"
    kinds = {type(c).__name__ for c in make_model_cache(model, kv) if not _mergeable(c)}
    if kinds:
        return f"mlx-lm cannot merge its {', '.join(sorted(kinds))} into a batch"
    return getattr(model, "_batching_refusal", None)


def refuse_batching(model: nn.Module, why: Optional[str]) -> None:
    """Record, on the model the scheduler asks (`can_batch`), why batching is off ring-wide."""
    object.__setattr__(model, "_batching_refusal", why)


def can_batch(model: nn.Module, kv: KVSettings) -> bool:
    return batching_refusal(model, kv) is None


def prefix_refusal(model: nn.Module, kv: KVSettings) -> Optional[str]:
    """Why a stored cache cannot be cut back to a shared prefix, or None when it can."""
    if kv.bits is not None:
        return "KV_BITS is set"
    if kv.max_size is not None:
        return "KV_CACHE_MAX_SIZE is set"
    kinds = {type(c).__name__ for c in make_model_cache(model, kv) if not _prefix_trimmable(c)}
    return f"the model's {', '.join(sorted(kinds))} cannot be cut back to a prefix" if kinds else None


def can_reuse_prefixes(model: nn.Module, kv: KVSettings) -> bool:
    return prefix_refusal(model, kv) is None


def restore(caches: list, tokens: int) -> list:
    """A copy of stored `caches` cut back to their first `tokens` tokens."""
    restored = copy.deepcopy(caches)
    trim_prompt_cache(restored, restored[0].size() - tokens)
    return restored


def _rounded(tokens: int) -> int:
    """Tokens held by caches that grow in whole allocation steps."""
    return -(-tokens // ALLOCATION_STEP) * ALLOCATION_STEP


@dataclass(frozen=True)
class KVFootprint:
    """What one sequence's caches take on a stage: `per_token` bytes for each token of
    caches that grow with the sequence, `windows` (tokens, bytes per token) for caches
    that stop growing at a window, and `fixed` bytes of state of one size (SSM, conv)."""

    per_token: int = 0
    windows: tuple[tuple[int, int], ...] = ()
    fixed: int = 0

    def bytes_for(self, tokens: int) -> int:
        """Bytes a sequence of `tokens` tokens holds, in whole allocation steps."""
        held = _rounded(tokens)
        return self.fixed + self.per_token * held + sum(b * min(held, w) for w, b in self.windows)

    def to_json(self) -> dict:
        return {"per_token": self.per_token, "windows": self.windows, "fixed": self.fixed}

    @classmethod
    def from_json(cls, data: dict) -> "KVFootprint":
        return cls(data["per_token"], tuple(map(tuple, data["windows"])), data["fixed"])


def tokens_capacity(budget_bytes: int, per_token: int) -> int:
    """Tokens of caches that grow `per_token` bytes a token that fit in `budget_bytes`."""
    return budget_bytes // max(per_token, 1)
