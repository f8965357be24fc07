"""Which stored KV caches exist, decided on rank 0 alone.

Every rank stores its own layers' caches under the same entry ids; rank 0 keeps
the index (a token trie from mlx-lm plus an LRU order) and tells the others
what to store, reuse and evict, so all ranks always agree on what is cached.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from mlx_lm.models.cache import PromptTrie

_MODEL = "served"  # PromptTrie keys entries by model too; a ring serves one


@dataclass(frozen=True)
class Reuse:
    """Start a sequence from `entry`, cut back to its first `tokens` tokens."""

    entry: int
    tokens: int


class PromptCacheIndex:
    """LRU index of stored caches, bounded by `capacity` tokens in all (the
    per-rank byte budget over the largest per-token size of any rank)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.trie = PromptTrie()
        self.entries: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self.tokens = 0
        self._next_entry = 0

    def lookup(self, prompt: list[int]) -> Optional[Reuse]:
        """The stored entry sharing the longest prefix with `prompt`; at least
        the last prompt token is always left to compute, for its logits."""
        if not self.entries or len(prompt) < 2:
            return None
        found = self.trie.search(_MODEL, prompt)
        best: Optional[Reuse] = None
        candidates = []
        if found.exact is not None:
            candidates.append((found.exact, len(prompt) - 1))
        if found.shorter is not None:
            candidates.append((found.shorter, len(found.shorter)))
        if found.longer is not None:
            candidates.append((found.longer, min(found.common_prefix, len(prompt) - 1)))
        for key, tokens in candidates:
            if tokens > 0 and (best is None or tokens > best.tokens):
                best = Reuse(self.trie.get(_MODEL, key), tokens)
        if best is not None:
            self.entries.move_to_end(best.entry)
        return best

    def insert(self, tokens: list[int]) -> tuple[Optional[int], list[int]]:
        """Index a cache of `tokens`; returns its entry id (None when it can't
        fit) and the entries to evict: least recently used ones, and stored
        prefixes of `tokens`, which the new entry serves as well."""
        key = tuple(tokens)
        if not key or len(key) > self.capacity:
            return None, []
        entry = self._next_entry
        self._next_entry += 1
        replaced = self.trie.add(_MODEL, list(key), entry)
        evicted = [old for _, old in self.trie.pop_prefixes(_MODEL, list(key))]
        evicted += [replaced] if replaced is not None else []
        for old in evicted:
            self.tokens -= len(self.entries.pop(old))
        self.entries[entry] = key
        self.tokens += len(key)
        while self.tokens > self.capacity:
            old, oldest = self.entries.popitem(last=False)
            self.trie.pop(_MODEL, list(oldest))
            self.tokens -= len(oldest)
            evicted.append(old)
        return entry, evicted

    def clear(self) -> list[int]:
        """Forget every stored cache; returns their entry ids, for the ranks to evict.
        Entry ids go on from where they were, so none is ever reused."""
        dropped = list(self.entries)
        self.trie = PromptTrie()
        self.entries.clear()
        self.tokens = 0
        return dropped
