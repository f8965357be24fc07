"""Rank 0 carries out operations on the ring queued in the spool (the dashboard's)."""

from __future__ import annotations

import logging

from distributed.messages import Header, Op
from distributed.scheduler import Scheduler
from spool import Spool
from spool.protocol import ControlDone

log = logging.getLogger(__name__)


def reset_prefix_cache(scheduler: Scheduler) -> ControlDone:
    """Drop every stored prompt cache, on every rank: rank 0 forgets its index and tells
    each rank to evict each entry, as it does for an entry the LRU pushes out. Sequences
    under way keep the caches they started from (a rank copies an entry when it opens
    a sequence on it)."""
    index = scheduler.prompt_cache
    if index is None:
        return ControlDone(action="reset_prefix_cache")
    tokens = index.tokens
    dropped = index.clear()
    for entry in dropped:
        scheduler.pipeline.tell(Header(Op.EVICT, seq=entry))
    log.info("prompt cache reset: %d entries, %d tokens dropped on every rank", len(dropped), tokens)
    return ControlDone(action="reset_prefix_cache", dropped_entries=len(dropped), dropped_tokens=tokens)


_ACTIONS = {"reset_prefix_cache": reset_prefix_cache}


def carry_out_controls(spool: Spool, scheduler: Scheduler) -> None:
    """Every operation waiting in the spool, in the order they came; each answered there."""
    for control_id, control in spool.take_controls():
        spool.answer_control(control_id, _ACTIONS[control.action](scheduler))
