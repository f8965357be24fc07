"""What a request may ask of the ring: its length, and the KV cache it reserves."""

from __future__ import annotations

from dataclasses import dataclass

from distributed.kv_cache import KVSettings, tokens_reserved


class RequestError(ValueError):
    """Work the cluster refuses (too long for the limits); nothing was started."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    """Token limits: MAX_SEQUENCE_LENGTH per sequence, and the KV tokens that
    KV_CACHE_RESERVED_MEMORY_MB holds on the tightest rank, for all active
    sequences together."""

    max_sequence_length: int
    kv_capacity: int
    kv: KVSettings = KVSettings()

    def reserve(self, prompt_tokens: int, max_tokens: int) -> int:
        """KV tokens a sequence needs; refuses work that could never run."""
        total = prompt_tokens + max_tokens
        if prompt_tokens < 1:
            raise RequestError("the prompt has no tokens", "invalid_prompt")
        if total > self.max_sequence_length:
            raise RequestError(
                f"this request needs {total} tokens ({prompt_tokens} prompt + {max_tokens} "
                f"to generate) but MAX_SEQUENCE_LENGTH is {self.max_sequence_length}",
                "context_length_exceeded",
            )
        need = tokens_reserved(total, self.kv)
        if need > self.kv_capacity:
            raise RequestError(
                f"this request needs {need} tokens of KV cache but "
                f"KV_CACHE_RESERVED_MEMORY_MB holds {self.kv_capacity} tokens",
                "kv_cache_exceeded",
            )
        return need
