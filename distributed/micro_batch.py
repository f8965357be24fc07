"""Rank 0's records of the micro-batches it steps around the ring, and of the steps in flight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from distributed.transport import StepWork


@dataclass
class MicroBatch:
    """Sequences rank 0 steps together: prompt chunks, then one token each per step.
    `batch` is its id in every rank's batch table."""

    batch: int
    members: list[int]
    decoding: bool = False
    work: Optional[StepWork] = None  # its next decode step, built ahead
    chunks: int = 0  # prompt chunks launched
    most_in_flight: int = 0  # of its chunks at once: how far its prefill pipelined


@dataclass
class Flight:
    """A launched step whose tokens (or acknowledgement) are on their way back."""

    batch: int
    members: list[int]
    results: list[mx.array]  # on a ring, what comes back, in order; the tokens last
    sample: bool
    drafts: list[int]  # proposals it verifies, after its one row's first token
