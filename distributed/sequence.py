"""One sequence as rank 0 tracks it, and the result each token it draws gives.

This is the one place that decides whether a token ends its sequence: an
end-of-sequence token ends it with "stop", the max_tokens-th token with "length".
Stop strings are matched on text, where text is made (`text_stream`), which then
finishes the sequence through the scheduler; so does a client's cancel.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal, Optional

from distributed.constraint import GrammarConstraint
from spool.protocol import TokenLogprob


@dataclass(frozen=True)
class TokenResult:
    """A token a sequence drew; with a `finish_reason`, its last."""

    seq: int
    token: int
    finish_reason: Optional[Literal["stop", "length"]] = None
    logprob: Optional[TokenLogprob] = None  # when its request asked for log-probabilities
    from_draft: bool = False  # a speculative proposal the model accepted

    @property
    def in_completion(self) -> bool:
        """An end-of-sequence token ("stop" here) is no part of the completion:
        not of its text, nor of the tokens its usage counts."""
        return self.finish_reason != "stop"


@dataclass
class Sequence:
    """One sequence as rank 0 tracks it."""

    seq: int
    batch: int  # the id of the batch it steps in
    tokens: list[int]  # the prompt, then every token generated
    prompt_tokens: int
    max_tokens: int
    reserved: int  # KV tokens held for it
    cached: int  # prompt tokens taken from the prompt cache
    fed: int  # tokens the model has been given
    finished: bool = False
    left: bool = False
    constraint: Optional[GrammarConstraint] = None  # its grammar, if its request has one
    logprob_log: Optional[deque] = None  # its sampler's draws' log-probabilities, if asked for
    background: bool = False  # a batch line: its prompt waits while an interactive one's runs

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_tokens

    def reaches_length(self, ahead: int = 0) -> bool:
        """Whether max_tokens are drawn once `ahead` more tokens are."""
        return self.generated + ahead >= self.max_tokens

    def draw(self, token: int, eos_token_ids: frozenset[int], from_draft: bool = False) -> TokenResult:
        """Take the next token (`from_draft`: an accepted proposal); the result says
        whether it ends the sequence."""
        self.tokens.append(token)
        if self.constraint is not None:
            self.constraint.consume(token)
        logprob = None
        if self.logprob_log is not None:
            chosen, top_ids, top_values = self.logprob_log.popleft()
            logprob = TokenLogprob(token=token, logprob=chosen.item(),
                                   top=sorted(zip(top_ids[0].tolist(), top_values[0].tolist()), key=lambda t: -t[1]))
        if token in eos_token_ids:
            return TokenResult(self.seq, token, "stop", logprob, from_draft)
        return TokenResult(self.seq, token, "length" if self.reaches_length() else None, logprob, from_draft)
