"""What rank 0's heartbeat tells beyond its state, for the dashboard: the settings the
ring serves with, and running figures (tokens generated over the last minutes, time to
first token, prompt-cache use)."""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Callable

BUCKET_S = 5  # s of generation each throughput figure covers
BUCKETS = 60  # throughput figures kept: the last 5 minutes
TTFT_WINDOW = 100  # recent requests the time to first token's median is taken over


def ring_settings(settings) -> dict:
    """The settings the ring serves with that a person looking at it wants to see."""
    names = ("backend", "parallel", "layer_split", "micro_batches", "max_sequence_length", "prefill_step_size",
             "pipeline_prefill_step_size", "kv_cache_reserved_memory_mb", "kv_bits", "prompt_cache_mb", "fast_blas")
    return {name: getattr(settings, name) for name in names}


class ServingStats:
    """Counts rank 0 keeps as it serves; `record()` is their heartbeat form."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.generated = 0
        self.buckets: deque[list[int]] = deque(maxlen=BUCKETS + 1)  # [bucket index, tokens]
        self.ttfts: deque[float] = deque(maxlen=TTFT_WINDOW)
        self.prompt_cache_hits = 0
        self.prompt_cache_misses = 0

    def token(self) -> None:
        """One completion token drawn."""
        self.generated += 1
        index = int(self.clock() // BUCKET_S)
        if not self.buckets or self.buckets[-1][0] != index:
            self.buckets.append([index, 0])
        self.buckets[-1][1] += 1

    def answered(self, time_to_first_token: float, cached_tokens: int) -> None:
        """A request ended; `cached_tokens` of its prompt came from the prompt cache."""
        self.ttfts.append(time_to_first_token)
        if cached_tokens:
            self.prompt_cache_hits += 1
        else:
            self.prompt_cache_misses += 1

    def throughput(self) -> list[float]:
        """Tokens/s in each of the last BUCKETS whole buckets, oldest first (0 where
        nothing was generated); the bucket under way is left out, as it is not over."""
        current = int(self.clock() // BUCKET_S)
        counts = {index: tokens for index, tokens in self.buckets}
        return [round(counts.get(index, 0) / BUCKET_S, 2) for index in range(current - BUCKETS, current)]

    def record(self) -> dict:
        return {
            "generated_tokens": self.generated,
            "throughput": {"bucket_s": BUCKET_S, "tokens_per_s": self.throughput()},
            "ttft_p50_s": round(statistics.median(self.ttfts), 4) if self.ttfts else None,
            "prompt_cache_hits": self.prompt_cache_hits,
            "prompt_cache_misses": self.prompt_cache_misses,
        }
