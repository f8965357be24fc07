"""Per-sequence sampling, built from mlx-lm's samplers and logits processors."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from spool.protocol import SamplingParams


# Tokens a seeded sequence may draw before its random stream overlaps the next seed's.
SEED_STRIDE = 1_000_003


class TokenSampler:
    """Samples one sequence's tokens the way mlx-lm's generate_step does."""

    def __init__(self, params: SamplingParams, prompt: list[int]):
        self.sample: Callable[[mx.array], mx.array] = make_sampler(
            temp=params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k
        )
        self.processors = make_logits_processors(
            logit_bias=params.logit_bias, repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        )
        self.history = mx.array(prompt, dtype=mx.int32)
        self.seed = params.seed
        self.drawn = 0

    def __call__(self, logits: mx.array) -> mx.array:
        """Next token (shape [1]) from the logits of the last position."""
        logits = logits[:, -1, :]
        for processor in self.processors:
            logits = processor(self.history, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        if self.seed is not None:
            # Sequences share MLX's one random state and step in any order: a
            # seeded one reseeds it per token, so its draws are its own.
            mx.random.seed((self.seed * SEED_STRIDE + self.drawn) % 2**64)
            self.drawn += 1
        token = self.sample(logprobs).astype(mx.int32)
        if self.processors:
            self.history = mx.concatenate([self.history, token])
        return token
