"""One rank's part of a tensor-parallel step: the ranks of a stage run every step together.

Rank 0 schedules as in the pipeline and sends its messages (headers, a new
sequence's JSON) around the doorbells, so every rank keeps the same batch table and
its caches, of its own heads. A step's all-reduces keep a stage's ranks in step;
between steps they sleep on their doorbells for rank 0's next header. The token ids
rank 0 feeds a step (drawn by its samplers, or prompt chunks) reach the rest of the
first stage through one more, small all-reduce at the step's start, so rank 0 can
build a step's graph before the tokens it feeds are known, as mlx-lm's generate loop
does. With one stage (tensor mode) rank 0 computes the logits itself; with several
(TENSOR_PARALLEL), the last stage computes them and the ring's last rank sends them
to rank 0, as the pipeline's last rank does.
"""

from __future__ import annotations

import mlx.core as mx

from distributed.pipeline import Pipeline
from distributed.tensor import tensor_head
from distributed.transport import StepWork


class TensorPipeline(Pipeline):
    """This rank's 1/T of every layer of its stage, its batch table, and the doorbells
    to its neighbours; `group`: the ranks of its stage."""

    def __init__(self, *args, group: mx.distributed.Group, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group
        self.tensor_head = tensor_head(self.model)

    def run(self, batch: int, ids: mx.array, sample: bool) -> StepWork:
        """As the pipeline's; every rank of a stage builds the same graph, so their
        collectives pair up. A sampling step shares the head (`TensorHead`), which
        every rank knows from the header alone."""
        if self.tensor_head is not None:
            self.tensor_head.shared = sample
        return super().run(batch, ids, sample)

    def forward(self, batch: int, ids: mx.array):
        """On the first stage, rank 0's ids (elsewhere zeros of their shape) reach
        every rank by an all-reduce."""
        if self.stage.in_first_stage:
            ids = mx.distributed.all_sum(ids, group=self.group)
        return super().forward(batch, ids)
