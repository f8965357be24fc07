"""Per-sequence sampling, built from mlx-lm's samplers and logits processors."""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from distributed.constraint import GrammarConstraint
from spool.protocol import SamplingParams


# Tokens a seeded sequence may draw before its random stream overlaps the next seed's.
SEED_STRIDE = 1_000_003


class TokenSampler:
    """Samples one sequence's tokens the way mlx-lm's generate_step does. A seeded
    sequence's draw at each position is fixed by (seed, position): one resumed after
    `drawn` tokens (its prompt holding them) goes on as if never stopped."""

    def __init__(self, params: SamplingParams, prompt: list[int], drawn: int = 0):
        self.sample: Callable[[mx.array], mx.array] = make_sampler(
            temp=params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k
        )
        self.processors = make_logits_processors(
            logit_bias=params.logit_bias, repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        )
        self.history = mx.array(prompt, dtype=mx.int32)
        self.seed = params.seed
        self.drawn = drawn
        self.constraint: Optional[GrammarConstraint] = None  # set by the scheduler for a grammar
        # Set by the scheduler for a request that wants log-probabilities: each draw's
        # (chosen, top ids, top log-probabilities), lazy, read once its token is known.
        self.logprob_log: Optional[deque] = None
        self.top_logprobs = 0

    def __call__(self, logits: mx.array, drafts: Optional[mx.array] = None) -> mx.array:
        """The next token at each position of a step's logits (shape [1, L, vocab] in,
        [L] out). A decode step has one position; a verification step's positions
        after the first follow `drafts` (L - 1 proposed tokens), each conditioned on
        the proposals before it, as mlx-lm's speculative decoding samples them."""
        history = self.history
        tokens = []
        for i in range(logits.shape[1]):
            context = mx.concatenate([history, drafts[:i]]) if i and self.processors else history
            tokens.append(self._draw(logits[:, i, :], context))
        tokens = mx.concatenate(tokens)
        if self.processors:
            self.history = mx.concatenate([history, tokens])
        return tokens

    def _draw(self, logits: mx.array, history: mx.array) -> mx.array:
        """One position's token (shape [1]) from its logits (shape [1, vocab])."""
        if self.constraint is not None:
            logits = mx.where(self.constraint.allowed(), logits, -mx.inf)
        for processor in self.processors:
            logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        if self.seed is not None:
            # Sequences share MLX's one random state and step in any order: a
            # seeded one reseeds it per token, so its draws are its own.
            mx.random.seed((self.seed * SEED_STRIDE + self.drawn) % 2**64)
        self.drawn += 1
        token = self.sample(logprobs).astype(mx.int32)
        if self.logprob_log is not None:
            k = self.top_logprobs
            top = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k] if k else mx.zeros((1, 0), mx.int32)
            self.logprob_log.append((mx.take_along_axis(logprobs, token[:, None], axis=-1), top,
                                     mx.take_along_axis(logprobs, top, axis=-1)))
        return token

    def rewind(self, count: int) -> None:
        """Forget the last `count` draws (rejected positions of a verification step,
        their log-probabilities the last unread ones): the next draw takes the first
        one's position and randomness."""
        if count <= 0:
            return
        self.drawn -= count
        if self.processors:
            self.history = self.history[: self.history.size - count]
        for _ in range(count if self.logprob_log is not None else 0):
            self.logprob_log.pop()


def check_sampling(params: SamplingParams, vocab_size: int) -> None:
    """Raise ValueError if sampling with `params` would fail (mlx-lm's samplers check
    some parameters only when called): one draw from flat logits, before the request
    reaches the ring, where such an error would take every request down with it."""
    trial = TokenSampler(params.model_copy(update={"seed": None}), [0])
    try:
        mx.eval(trial(mx.zeros((1, 1, vocab_size))))
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"the sampling parameters cannot be used: {err}") from err
