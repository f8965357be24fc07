"""Ranks after rank 0: apply its messages in the order they come, until it says stop."""

from __future__ import annotations

import mlx.core as mx

from distributed.messages import SAMPLE, SHARE_HEAD, Header, Op
from distributed.pipeline import Pipeline


def follow(pipeline: Pipeline) -> None:
    """Serve rank 0's messages until it says stop."""
    while True:
        header, payload = pipeline.transport.take()
        if header.op == Op.STOP:
            return
        if header.op == Op.STEP:
            _step(pipeline, header)
        else:
            pipeline.table.apply(header, payload)


def _step(pipeline: Pipeline, header: Header) -> None:
    """Run a step on this stage: rank 0 sends no token ids past itself, so the
    ids are stand-ins of the right shape; the input is the previous rank's output."""
    rows = len(pipeline.table.batches[header.batch].members)
    ids = mx.zeros((rows, header.length), dtype=mx.int32)
    work = pipeline.run(header.batch, ids, bool(header.flag & SAMPLE), bool(header.flag & SHARE_HEAD))
    pipeline.transport.bell.wait()  # the previous rank's output, received in the graph
    pipeline.transport.complete(work)
