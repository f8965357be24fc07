"""Constrained decoding on rank 0: a sequence whose request carries a grammar (a JSON
schema, a tool call's shape) draws only tokens the grammar allows, with llguidance."""

from __future__ import annotations

from functools import cached_property

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.hf import from_tokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask


class GrammarConstraint:
    """One sequence's grammar: the mask of allowed tokens before each draw, and the
    tokens drawn fed back in. The mask needs the previous token's value, so a
    constrained sequence's steps are not built ahead of its tokens (see the scheduler)."""

    def __init__(self, tokenizer: LLTokenizer, grammar: str, vocab_size: int):
        self.matcher = LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise ValueError(f"the grammar cannot be used: {self.matcher.get_error()}")
        self.bitmask = allocate_token_bitmask(1, tokenizer.vocab_size)
        self.vocab_size = vocab_size

    def allowed(self) -> mx.array:
        """Which of the model's logits may be drawn next (bool, one per logit); the
        logits past the tokenizer's vocabulary (padding) never."""
        fill_next_token_bitmask(self.matcher, self.bitmask)
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[: self.vocab_size]
        allowed = np.zeros(self.vocab_size, dtype=bool)
        allowed[: bits.size] = bits
        return mx.array(allowed)

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)


class Grammars:
    """Rank 0's maker of constraints for its tokenizer (built on first use: about 1 s)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    @cached_property
    def _ll_tokenizer(self) -> LLTokenizer:
        return from_tokenizer(self.tokenizer._tokenizer, eos_token=sorted(self.tokenizer.eos_token_ids))

    def constraint(self, grammar: str, drawn: list[int]) -> GrammarConstraint:
        """A sequence's constraint, fed the tokens it drew before a restart."""
        constraint = GrammarConstraint(self._ll_tokenizer, grammar, self.vocab_size)
        for token in drawn:
            constraint.consume(token)
        return constraint
