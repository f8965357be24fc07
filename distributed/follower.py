"""Ranks after rank 0: apply its messages in the order they come, until it says stop."""

from __future__ import annotations

from distributed.messages import Op
from distributed.pipeline import Pipeline


def follow(pipeline: Pipeline) -> None:
    """Serve rank 0's messages until it says stop."""
    while True:
        header, payload = pipeline.transport.take()
        if header.op == Op.STOP:
            return
        if header.op == Op.STEP:
            pipeline.follow_step(header)
        else:
            pipeline.table.apply(header, payload)
