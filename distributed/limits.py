"""What a request may ask of the ring: its length, and the KV cache it reserves."""

from __future__ import annotations

from dataclasses import dataclass

from distributed.kv_cache import KVFootprint


class RequestError(ValueError):
    """Work the cluster refuses (too long for the limits); nothing was started."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    """MAX_SEQUENCE_LENGTH per sequence, and the KV cache bytes KV_CACHE_RESERVED_MEMORY_MB
    gives each rank for all active sequences together; `footprints` are each rank's
    caches' cost (see `KVFootprint`)."""

    max_sequence_length: int
    kv_capacity: int
    footprints: tuple[KVFootprint, ...] = (KVFootprint(),)

    def reserve(self, prompt_tokens: int, max_tokens: int) -> int:
        """KV bytes a sequence needs on the rank where it needs most; refuses work that
        could never run."""
        total = prompt_tokens + max_tokens
        if prompt_tokens < 1:
            raise RequestError("the prompt has no tokens", "invalid_prompt")
        if total > self.max_sequence_length:
            raise RequestError(
                f"this request needs {total} tokens ({prompt_tokens} prompt + {max_tokens} "
                f"to generate) but MAX_SEQUENCE_LENGTH is {self.max_sequence_length}",
                "context_length_exceeded",
            )
        need = max(f.bytes_for(total) for f in self.footprints)
        if need > self.kv_capacity:
            raise RequestError(
                f"this request needs {need / 2**20:.1f} MiB of KV cache per rank but "
                f"KV_CACHE_RESERVED_MEMORY_MB is {self.kv_capacity / 2**20:.1f}",
                "kv_cache_exceeded",
            )
        return need
