"""One rank's part of a tensor-parallel step: every rank runs every step, together.

Rank 0 schedules as in the pipeline and sends its messages (headers, a new
sequence's JSON) around the doorbells, so every rank keeps the same batch table and
its caches, of its own heads. A step's all-reduces keep the ranks in step; between
steps they sleep on their doorbells for rank 0's next header. The token ids rank 0
feeds a step (drawn by its samplers, or prompt chunks) reach the others through one
more, small all-reduce at the step's start, so rank 0 can build a step's graph
before the tokens it feeds are known, as mlx-lm's generate loop does.
"""

from __future__ import annotations

import mlx.core as mx

from distributed.messages import SAMPLE, Header
from distributed.pipeline import Pipeline
from distributed.tensor import tensor_head
from distributed.transport import StepWork


class TensorPipeline(Pipeline):
    """This rank's 1/N of every layer, its batch table, and the doorbells to its neighbours."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tensor_head = tensor_head(self.model)

    @property
    def results_over_ring(self) -> bool:
        return False  # rank 0 computes the logits itself

    def run(self, batch: int, ids: mx.array, sample: bool) -> StepWork:
        """Build this rank's graph for one step of `batch`; every rank builds the same
        one, so their collectives pair up. On rank 0, `ids` are the step's tokens (lazy
        ones are fine); elsewhere zeros of their shape. With `sample`, rank 0 gets
        each row's next token; a sampling step shares the head (`TensorHead`), which
        every rank knows from the header alone."""
        drafts = ids[:, 1:]
        ids = mx.distributed.all_sum(ids, group=self.transport.world)
        if self.tensor_head is not None:
            self.tensor_head.shared = sample
        target, out = self.forward(batch, ids)
        if not sample:
            # Prefill: the caches are the output, as in mlx-lm. The scheduler reads a
            # step's last array as its tokens; a prefill has none, so zeros stand in.
            return StepWork([target.cache.state, mx.zeros((ids.shape[0],), dtype=mx.int32)])
        if self.stage.is_first:
            return StepWork([self.sample(target, out, drafts)])
        return StepWork([out])  # the last all-reduce's (or all-gather's) result

    def follow_step(self, header: Header) -> None:
        """Ranks after rank 0: run a step with rank 0; its collectives bring the input."""
        rows = len(self.table.batches[header.batch].members)
        ids = mx.zeros((rows, header.length), dtype=mx.int32)
        mx.eval(self.run(header.batch, ids, bool(header.flag & SAMPLE)).compute)
