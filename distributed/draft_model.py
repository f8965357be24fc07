"""DRAFT_MODEL on rank 0: a small model's greedy continuation, as speculation's proposals.

Greedy, so that what the ring keeps depends on the served model and the request's own
randomness alone: seeded output is the same with or without a draft model. Its caches
follow the sequence it last proposed for: they are cut back to what that shares with the
tokens now given (the verification's rejections, or another sequence's prompt), and only
the rest is fed. On a ring, rank 0 would idle while the other ranks verify: it drafts
ahead then, for the outcome where every proposal is accepted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from models import resolve_model

log = logging.getLogger(__name__)


class DraftModel:
    """A proposer (`distributed.speculation.Proposer`) backed by a model of its own."""

    def __init__(self, model: nn.Module, prefill_step_size: int):
        self.model = model
        self.prefill_step_size = prefill_step_size
        self.cache = make_prompt_cache(model)
        self.seen: list[int] = []  # the tokens its caches hold, in order
        self.ready: tuple[list[int], list[int]] = ([], [])  # tokens, and the proposals `ahead` made for them
        self.ready_used = 0  # passes whose proposals were ready

    def __call__(self, tokens: list[int], count: int) -> list[int]:
        """The draft model's next `count` greedy tokens after `tokens`."""
        if self.ready[0] == tokens and len(self.ready[1]) >= count:
            self.ready_used += 1
            return self.ready[1][:count]
        shared = 0
        for mine, theirs in zip(self.seen, tokens[:-1]):  # at least one token is fed
            if mine != theirs:
                break
            shared += 1
        trim_prompt_cache(self.cache, len(self.seen) - shared)
        steps = generate_step(mx.array(tokens[shared:], dtype=mx.uint32), self.model, max_tokens=count,
                              prompt_cache=self.cache, prefill_step_size=self.prefill_step_size)
        drafts = [token for token, _ in steps]
        self.seen = (tokens + drafts)[: self.cache[0].offset]
        return drafts

    def ahead(self, tokens: list[int], count: int) -> None:
        """While the ring verifies proposals (`tokens` ends with them): the proposals to
        follow if it accepts them all and draws the token the draft model would next."""
        guess, *after = self(tokens, count + 1)
        self.ready = (tokens + [guess], after)


def load_draft_model(ref: str, cache_dir: Path, tokenizer, prefill_step_size: int) -> DraftModel:
    """DRAFT_MODEL (a hub id, local directory or GGUF file, as MODEL_REPO), checked to
    share the served model's vocabulary; ValueError naming it otherwise."""
    try:
        model, draft_tokenizer = load(resolve_model(ref, cache_dir))
    except (OSError, ValueError) as err:
        raise ValueError(f"DRAFT_MODEL={ref!r} could not be loaded: {err}") from None
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"DRAFT_MODEL={ref!r} has another tokenizer than the model: its proposals' token ids "
                         "would mean other tokens; use a draft model of the same family")
    if not can_trim_prompt_cache(make_prompt_cache(model)):
        raise ValueError(f"DRAFT_MODEL={ref!r} has caches that cannot forget rejected proposals "
                         "(a sliding window or a recurrent state)")
    log.info("draft model %s loaded", ref)
    return DraftModel(model, prefill_step_size)
