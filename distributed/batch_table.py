"""Each rank's table of batches, and the caches stored for the prompt cache.

A batch is the sequences that step together, one row each in the batch KV cache
(mlx-lm's batch caches) and in every step's input. Every rank holds the same table:
rank 0 changes its own and sends each change around the ring as a message
(`distributed.messages`), and the other ranks apply them in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import mlx.nn as nn

from distributed.kv_cache import KVSettings, StageCache, restore
from distributed.messages import Header, Op
from distributed.sampling import SamplingParams, TokenSampler
from distributed.shard import Stage


@dataclass
class Batch:
    """Sequences that step together, one row each, in `members` order."""

    members: list[int]
    cache: StageCache
    samplers: list[TokenSampler] = field(default_factory=list)  # rank 0 only
    padded_prompt: int = 0  # tokens left of a padded prefill (see `prepare`)


class BatchTable:
    """This rank's batches by id, and its stored caches by entry id."""

    def __init__(self, model: nn.Module, stage: Stage, kv: KVSettings):
        self.model = model
        self.stage = stage
        self.kv = kv
        self.batches: dict[int, Batch] = {}
        self.stored: dict[int, list] = {}

    def apply(self, header: Header, payload: bytes) -> None:
        """A change rank 0 sent (every message but STOP and STEP)."""
        if header.op == Op.START:
            self.open(header.batch, header.seq, json.loads(payload))
        elif header.op == Op.MERGE:
            self.merge(header.batch, header.seq)
        elif header.op == Op.PREPARE:
            self.prepare(header.batch, json.loads(payload))
        elif header.op == Op.LEAVE:
            self.leave(header.batch, header.seq, header.length if header.flag else None)
        elif header.op == Op.EVICT:
            self.evict(header.seq)
        elif header.op == Op.TRIM:
            self.trim(header.batch, header.length)
        else:
            raise ValueError(f"not a change to the table: {header}")

    def open(self, batch: int, seq: int, work: dict) -> None:
        """A new sequence, alone in a new batch; `work` holds its prompt, sampling
        parameters, the tokens it drew before a restart (in its prompt), and the stored
        cache it starts from, if any."""
        local = None
        if work.get("reuse"):
            entry, tokens = work["reuse"]
            local = restore(self.stored[entry], tokens)
        cache = StageCache(self.model, self.stage.start, self.stage.end, self.kv, local)
        samplers = []
        if self.stage.is_first:
            samplers = [TokenSampler(SamplingParams.pick(work["params"]), work["prompt"], work.get("drawn", 0))]
        self.batches[batch] = Batch([seq], cache, samplers)

    def merge(self, into: int, batch: int) -> None:
        """The rows of `batch` join `into`, after its own."""
        joining = self.batches.pop(batch)
        target = self.batches[into]
        target.cache.join(joining.cache)
        target.members += joining.members
        target.samplers += joining.samplers

    def prepare(self, batch: int, padding: dict) -> None:
        """`batch`'s prompts (`padding["lengths"]` tokens each) go through right-padded
        to one length; the step that ends them moves the padding to the left."""
        target = self.batches[batch]
        target.cache.prepare(padding["lengths"], padding["right_padding"])
        target.padded_prompt = max(padding["lengths"])

    def leave(self, batch: int, seq: int, store: Optional[int] = None) -> None:
        """`seq` is done; with `store`, its cache is kept as that stored entry."""
        target = self.batches[batch]
        row = target.members.index(seq)
        if store is not None:
            self.stored[store] = target.cache.row(row)
        if len(target.members) == 1:
            del self.batches[batch]
            return
        rows = [i for i in range(len(target.members)) if i != row]
        target.cache.keep(rows)
        target.members.pop(row)
        if target.samplers:
            target.samplers.pop(row)

    def trim(self, batch: int, tokens: int) -> None:
        """`batch` forgets its last `tokens` positions (a verification's rejected
        proposals): its caches, and on rank 0 its sampler's draws."""
        target = self.batches[batch]
        target.cache.trim(tokens)
        for sampler in target.samplers:
            sampler.rewind(tokens)

    def evict(self, entry: int) -> None:
        self.stored.pop(entry, None)
