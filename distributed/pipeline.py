"""One rank's stage of the ring: the graph a step builds here, and what rank 0 gets back.

A step runs one batch (one row per sequence, see `distributed.batch_table`) through
this rank's layers; the last rank sends the batch's logits back to rank 0,
which samples. A sampling step shares the head (`SharedHead`): the last rank first
sends the head's input, and rank 0 computes half of the logits meanwhile.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from distributed.doorbell import Doorbell
from distributed.batch_table import Batch, BatchTable
from distributed.kv_cache import KVSettings
from distributed.messages import SAMPLE, Header, Op
from distributed.shard import Stage, logits_shape, sending_layer, shared_head
from distributed.transport import StepWork, Transport


class Pipeline:
    """This rank's part of the ring: its model stage, batch table and links."""

    def __init__(
        self,
        model: nn.Module,
        stage: Stage,
        world: mx.distributed.Group,
        kv: KVSettings,
        bell: Optional[Doorbell] = None,
    ):
        self.model = model
        self.stage = stage
        self.kv = kv
        self.head = shared_head(model)  # rank 0 and the last rank of a ring, if it may be shared
        self.vocab, self.logits_dtype = logits_shape(model)
        self.table = BatchTable(model, stage, kv)
        self.transport = Transport(stage, world, bell)

    @property
    def results_over_ring(self) -> bool:
        """Whether a step's results come back to rank 0 around the ring (more than
        one stage), rather than computed on rank 0 itself."""
        return self.stage.stages > 1

    def tell(self, header: Header, payload: bytes = b"") -> None:
        """Rank 0: a change to the table, made on every rank in the same order."""
        self.transport.broadcast(header, payload)
        self.table.apply(header, payload)

    def shutdown(self) -> None:
        """Rank 0: release the other ranks from `distributed.follower.follow`."""
        self.transport.broadcast(Header(Op.STOP))

    def run(self, batch: int, ids: mx.array, sample: bool) -> StepWork:
        """Build this stage's graph for one step of `batch` (ids: rows x tokens).
        With `sample`, the last stage computes the batch's logits: on one stage rank 0
        samples them, on a ring the last rank sends them to rank 0 (with a shared
        head, only the rows after its split, after sending the head's input)."""
        drafts = ids[:, 1:]
        target, out = self.forward(batch, ids)
        # What a step computes is its output, which every cache update feeds. Only a
        # prefill without logits names the caches: mlx-lm's caches hand out their own
        # arrays as `state`, and the next step's update rewrites those in place, so
        # a step started in the background must not name them.
        if not self.stage.in_last_stage:
            if self.stage.sends_hidden:
                return StepWork([sending_layer(self.model).sending], out)
            return StepWork([out])  # a rank whose stage's output another rank sends
        if not sample:
            # Prefill: like mlx-lm, skip the logits nobody reads; on a ring an
            # acknowledgement still goes back, so rank 0 never has more steps in
            # flight than stages. Without one, zeros stand in for a step's tokens.
            ack = mx.zeros((ids.shape[0],), dtype=mx.int32)
            work = StepWork([target.cache.state, ack])
            if self.results_over_ring and self.stage.is_last:
                work.send = self.transport.send(ack)
            return work
        if not self.results_over_ring and self.stage.is_first:
            return StepWork([self.sample(target, out, drafts)])
        if not (self.results_over_ring and self.stage.is_last):
            return StepWork([out])  # the logits' all-gather, on the other ranks of a last stage
        work = StepWork([out], self.transport.send(out))
        if self.head is not None:
            hidden = self.head.hidden
            work = StepWork([hidden], self.transport.send(hidden), then=work)
        return work

    def forward(self, batch: int, ids: mx.array) -> tuple[Batch, mx.array]:
        """The model's forward pass over `batch`'s caches (a graph, not computed)."""
        target = self.table.batches[batch]
        out = self.model(ids, cache=target.cache.view())
        if target.padded_prompt > 0:
            target.padded_prompt -= ids.shape[1]
            if target.padded_prompt <= 0:
                target.cache.finalize()
        target.cache.maybe_quantize()
        return target, out

    def follow_step(self, header: Header) -> None:
        """Ranks after rank 0: run a step on this stage. Rank 0 sends no token ids
        past itself, so the ids are stand-ins of the right shape; the input is the
        previous rank's output (in a stage of several ranks, shared by the first)."""
        rows = len(self.table.batches[header.batch].members)
        ids = mx.zeros((rows, header.length), dtype=mx.int32)
        work = self.run(header.batch, ids, bool(header.flag & SAMPLE))
        if not self.stage.in_first_stage:
            self.transport.bell.wait()  # the previous stage's output, received in the graph
            if self.stage.wakes_next:
                self.transport.bell.ring()
        self.transport.complete(work)

    def sample(self, target: Batch, logits: mx.array, drafts: mx.array) -> mx.array:
        """Rank 0: the next token at each position of each row of a batch, row after
        row, from its logits; `drafts` (rows x positions - 1): the tokens fed after
        each row's first, which later positions are conditioned on (a verification)."""
        return mx.concatenate([s(logits[i : i + 1], drafts[i]) for i, s in enumerate(target.samplers)])

    def receive_ack(self, rows: int) -> list[mx.array]:
        """Rank 0 of a ring: the last rank's acknowledgement of a prefill step (lazy)."""
        return [self.transport.receive_array((rows,), mx.int32)]

    def receive_tokens(self, batch: int, drafts: mx.array) -> list[mx.array]:
        """Rank 0 of a ring: what a sampling step sends back, in order (lazy); the
        last is the tokens, sampled from the logits the last rank sends (one
        position per token fed: the first, then `drafts`, see `sample`). With a
        shared head, the head's input comes first, and rank 0's half of the logits
        from it comes before the tokens, to compute while the last rank does the rest."""
        target = self.table.batches[batch]
        rows, length, head = len(target.members), 1 + drafts.shape[1], self.head
        if head is None:
            return [self.sample(target, self.transport.receive_array((rows, length, self.vocab), self.logits_dtype),
                                drafts)]
        hidden = self.transport.receive_array((rows, length, head.hidden_size), head.input_dtype)
        first = head.logits(hidden, 0, head.split)
        rest = self.transport.receive_array((rows, length, self.vocab - head.split), self.logits_dtype)
        return [first, self.sample(target, mx.concatenate([first, rest], axis=-1), drafts)]
