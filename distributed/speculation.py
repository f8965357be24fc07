"""Speculative decoding on rank 0: what to propose, and how much of it the ring accepted.

A sequence decoding alone sends its last token and up to NUM_DRAFT_TOKENS proposals
around the ring as one step; the step samples every position, each conditioned on the
proposals before it, and the proposals are taken while they equal what was sampled
(mlx-lm's `speculative_generate_step` rule). Every token kept is thus a sample of the
model given the tokens before it, drawn with its own position's randomness: greedy
and seeded output are those of decoding without speculation.

Proposers are plain functions of the sequence's tokens: `propose_ngram` (prompt
lookup) here, a draft model's greedy continuation in `distributed.draft_model`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from distributed.sequence import Sequence, TokenResult

# Longest n-gram prompt lookup matches: longer ones are rarer, shorter ones less telling.
MAX_NGRAM = 3

log = logging.getLogger(__name__)

Proposer = Callable[[list[int], int], list[int]]


def propose_ngram(tokens: list[int], count: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Prompt lookup: the up to `count` tokens that followed the latest earlier
    occurrence of the sequence's last n tokens, trying the longest n first; none
    when its last token never occurred before."""
    ids = np.asarray(tokens)
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        # Windows that start before the last n tokens do.
        windows = sliding_window_view(ids[:-1], n)
        found = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if found.size:
            start = int(found[-1]) + n
            return tokens[start : start + count]
    return []


def accepted_prefix(proposed: list[int], sampled: list[int]) -> int:
    """How many proposals were right: the leading ones the step sampled too."""
    count = 0
    for mine, theirs in zip(proposed, sampled):
        if mine != theirs:
            break
        count += 1
    return count


@dataclass
class SpeculationStats:
    """Verification passes and their tokens, since start (rank 0's heartbeat)."""

    passes: int = 0
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0  # kept from verification passes: accepted proposals and the step's own

    def record(self, proposed: int, accepted: int, kept: int) -> None:
        self.passes += 1
        self.proposed += proposed
        self.accepted += accepted
        self.tokens += kept

    def to_json(self) -> dict:
        return {
            "passes": self.passes,
            "proposed_tokens": self.proposed,
            "accepted_tokens": self.accepted,
            "acceptance_rate": self.accepted / self.proposed if self.proposed else None,
            "tokens_per_pass": self.tokens / self.passes if self.passes else None,
        }


class Speculation:
    """SPECULATION's proposer and NUM_DRAFT_TOKENS, and its record since start."""

    def __init__(self, mode: str, proposer: Proposer, num_draft_tokens: int):
        self.mode = mode
        self.proposer = proposer
        self.num_draft_tokens = num_draft_tokens
        self.stats = SpeculationStats()

    def propose(self, sequence: Sequence) -> list[int]:
        """Proposals to follow a decoding sequence's tokens: as many as it may still
        draw after the verification step's own token, up to NUM_DRAFT_TOKENS."""
        count = min(self.num_draft_tokens, sequence.max_tokens - sequence.generated - 1)
        return self.proposer(sequence.tokens, count)[:count] if count > 0 else []

    def ahead(self, sequence: Sequence, proposed: list[int]) -> None:
        """While the ring verifies `proposed`: a draft model drafts its next proposals
        for the outcome where all are accepted (prompt lookup needs no head start)."""
        if hasattr(self.proposer, "ahead") and not sequence.finished:
            self.proposer.ahead(sequence.tokens + proposed, self.num_draft_tokens)

    def take(self, sequence: Sequence, proposed: list[int], sampled: list[int],
             eos_token_ids: frozenset[int]) -> list[TokenResult]:
        """The tokens a verification step gives `sequence`: the proposals it sampled
        too, then its own token after them, up to the one that ends the sequence."""
        right = accepted_prefix(proposed, sampled)
        results = []
        for i, token in enumerate(sampled[: right + 1]):
            results.append(sequence.draw(token, eos_token_ids, from_draft=i < right))
            if results[-1].finish_reason is not None:
                break
        self.stats.record(len(proposed), sum(r.from_draft for r in results), len(results))
        return results

    def record(self, active: int) -> dict:
        """For rank 0's heartbeat, with `active` sequences on the ring: speculation
        waits while there are several, and says so."""
        paused = f"{active} sequences active" if active > 1 else None
        ready = getattr(self.proposer, "ready_used", None)  # a draft model's passes drafted ahead
        return {"mode": self.mode, "num_draft_tokens": self.num_draft_tokens, "paused": paused,
                **self.stats.to_json(), **({"drafted_ahead": ready} if ready is not None else {})}


def make_speculation(settings, tokenizer) -> Optional[Speculation]:
    """Rank 0's speculation as SPECULATION says (None when off); ValueError naming
    DRAFT_MODEL if it cannot propose for this model."""
    if settings.speculation == "off":
        return None
    proposer: Proposer = propose_ngram
    if settings.speculation == "draft":
        from distributed.draft_model import load_draft_model

        proposer = load_draft_model(settings.draft_model, settings.model_cache_dir, tokenizer,
                                    settings.prefill_step_size)
    log.info("speculation: %s, up to %d proposals a pass", settings.speculation, settings.num_draft_tokens)
    return Speculation(settings.speculation, proposer, settings.num_draft_tokens)
