"""The ring's protocol and each rank's tables of sequence groups.

Rank 0 (see `distributed.scheduler`) decides everything and sends each decision
around the ring as a message: open a sequence, step a group, merge two groups,
prepare a group's prompts to be prefilled together, a sequence leaves, a stored
cache is evicted. Every rank applies the messages in the order they arrive, so
all ranks' tables stay alike. A step runs one group (one batch row per sequence)
through this rank's layers; the last rank samples and sends the group's tokens
back to rank 0.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from distributed.doorbell import Doorbell
from distributed.kv_cache import KVSettings, StageCache, restore, tokens_reserved
from distributed.sampling import SamplingParams, TokenSampler
from distributed.shard import Stage

OP_STOP, OP_START, OP_STEP, OP_MERGE, OP_PREPARE, OP_LEAVE, OP_EVICT = range(7)


class RequestError(ValueError):
    """Work the cluster refuses (too long for the limits); nothing was started."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


_HEADER = struct.Struct("!5i")  # op, group, seq, length, flag


@dataclass(frozen=True)
class Header:
    """The start of every message from rank 0.

    START: `group` and `seq` are new ids; the JSON payload is the sequence's work.
    STEP: `length` tokens per row; `flag` set when the last rank samples.
    MERGE: `seq` is the group merged into `group`.
    PREPARE: `group`'s rows are prefilled together next; the JSON payload says how.
    LEAVE: `seq` leaves `group`; with `flag`, its cache is stored as entry `length`.
    EVICT: `seq` is the stored entry to drop.
    """

    op: int
    group: int = 0
    seq: int = 0
    length: int = 0
    flag: int = 0

    def encode(self) -> bytes:
        return _HEADER.pack(self.op, self.group, self.seq, self.length, self.flag)

    @classmethod
    def decode(cls, data: bytes) -> "Header":
        return cls(*_HEADER.unpack(data))


@dataclass
class StepWork:
    """One step on one rank: what to compute, then the send to the next rank (None
    on a single rank), so the next rank's doorbell rings between the two."""

    compute: list
    send: Optional[mx.array] = None


@dataclass
class Group:
    """Sequences that step together, one batch row each, in `members` order."""

    members: list[int]
    cache: StageCache
    samplers: list[TokenSampler] = field(default_factory=list)  # last rank only
    padded_prompt: int = 0  # tokens left of a padded prefill (see `prepare`)


@dataclass(frozen=True)
class Limits:
    """Token limits: MAX_SEQUENCE_LENGTH per sequence, and the KV tokens that
    KV_CACHE_RESERVED_MEMORY_MB holds on the tightest rank, for all active
    sequences together."""

    max_sequence_length: int
    kv_capacity: int
    kv: KVSettings = KVSettings()

    def reserve(self, prompt_tokens: int, max_tokens: int) -> int:
        """KV tokens a sequence needs; refuses work that could never run."""
        total = prompt_tokens + max_tokens
        if prompt_tokens < 1:
            raise RequestError("the prompt has no tokens", "invalid_prompt")
        if total > self.max_sequence_length:
            raise RequestError(
                f"this request needs {total} tokens ({prompt_tokens} prompt + {max_tokens} "
                f"to generate) but MAX_SEQUENCE_LENGTH is {self.max_sequence_length}",
                "context_length_exceeded",
            )
        need = tokens_reserved(total, self.kv)
        if need > self.kv_capacity:
            raise RequestError(
                f"this request needs {need} tokens of KV cache but "
                f"KV_CACHE_RESERVED_MEMORY_MB holds {self.kv_capacity} tokens",
                "kv_cache_exceeded",
            )
        return need


class Pipeline:
    """This rank's part of the ring: its model stage, group table and stored caches."""

    def __init__(
        self,
        model: nn.Module,
        stage: Stage,
        group: mx.distributed.Group,
        kv: KVSettings,
        bell: Optional[Doorbell] = None,
    ):
        self.model = model
        self.stage = stage
        self.group = group
        self.kv = kv
        self.bell = bell  # None on a single rank
        self.groups: dict[int, Group] = {}
        self.stored: dict[int, list] = {}
        self.unsent: list[StepWork] = []  # rank 0: started steps whose output is not sent yet

    # Transport: neighbour-only, as the ring backend requires. Arrays go over MLX,
    # each announced on the next rank's doorbell, and every receive waits for that
    # first; rank 0's messages go over the doorbell's connection itself.

    def start(self, work: StepWork) -> None:
        """Rank 0: compute a step in the background; its output is sent at `flush`."""
        mx.async_eval(work.compute)
        if work.send is not None:
            self.unsent.append(work)

    def flush(self) -> None:
        """Rank 0: send the outputs of started steps, each once it is computed."""
        while self.unsent:
            self.complete(self.unsent.pop(0))

    def complete(self, work: StepWork) -> None:
        """Compute a step, then send its output on (announced first)."""
        mx.eval(work.compute)
        if work.send is not None:
            self.bell.ring()
            mx.eval(work.send)

    def arrived(self, data: mx.array) -> mx.array:
        """A lazy receive from the previous rank, once it is there."""
        self.bell.wait()
        mx.eval(data)
        return data

    def broadcast(self, header: Header, payload: bytes = b"") -> None:
        """Rank 0: start a message around the ring; a started step's output goes
        first, as the next rank expects it right after that step's header."""
        if self.stage.size > 1:
            self.flush()
            self.bell.post(header.encode() + payload)

    def check_ring(self) -> None:
        """Rank 0, idle: raise RingBroken if a rank is gone. A rank whose previous
        rank died leaves too, so any loss reaches rank 0's own doorbell."""
        if self.bell is not None:
            self.bell.check()

    def receive_tokens(self, rows: int) -> mx.array:
        """Rank 0 of a ring: the tokens of the oldest step in flight (lazy)."""
        return mx.distributed.recv((rows,), mx.int32, self.stage.prev_rank, group=self.group)

    def _receive(self) -> tuple[Header, bytes]:
        """Other ranks: take the next message and pass it on (the last rank doesn't)."""
        message = self.bell.take()
        if not self.stage.is_last:
            self.bell.post(message)
        return Header.decode(message[: _HEADER.size]), message[_HEADER.size :]

    # The table; every rank applies the same changes in the same order.

    def open(self, group: int, seq: int, work: dict) -> None:
        """A new sequence, alone in a new group; `work` holds its prompt, sampling
        parameters, and the stored cache it starts from, if any."""
        local = None
        if work.get("reuse"):
            entry, tokens = work["reuse"]
            local = restore(self.stored[entry], tokens)
        cache = StageCache(self.model, self.stage.start, self.stage.end, self.kv, local)
        samplers = []
        if self.stage.is_last:
            samplers = [TokenSampler(SamplingParams.pick(work["params"]), work["prompt"])]
        self.groups[group] = Group([seq], cache, samplers)

    def merge(self, into: int, group: int) -> None:
        """The rows of `group` join `into`, after its own."""
        joining = self.groups.pop(group)
        target = self.groups[into]
        target.cache.join(joining.cache)
        target.members += joining.members
        target.samplers += joining.samplers

    def prepare(self, group: int, padding: dict) -> None:
        """`group`'s prompts (`padding["lengths"]` tokens each) go through right-padded
        to one length; the step that ends them moves the padding to the left."""
        target = self.groups[group]
        target.cache.prepare(padding["lengths"], padding["right_padding"])
        target.padded_prompt = max(padding["lengths"])

    def leave(self, group: int, seq: int, store: Optional[int] = None) -> None:
        """`seq` is done; with `store`, its cache is kept as that stored entry."""
        target = self.groups[group]
        row = target.members.index(seq)
        if store is not None:
            self.stored[store] = target.cache.row(row)
        if len(target.members) == 1:
            del self.groups[group]
            return
        rows = [i for i in range(len(target.members)) if i != row]
        target.cache.keep(rows)
        target.members.pop(row)
        if target.samplers:
            target.samplers.pop(row)

    def evict(self, entry: int) -> None:
        self.stored.pop(entry, None)

    def run(self, group: int, ids: mx.array, sample: bool) -> StepWork:
        """Build this stage's graph for one step of `group` (ids: rows x tokens).
        The last stage computes the group's tokens, sent on to rank 0 when that
        is another rank."""
        target = self.groups[group]
        out = self.model(ids, cache=target.cache.view())
        if target.padded_prompt > 0:
            target.padded_prompt -= ids.shape[1]
            if target.padded_prompt <= 0:
                target.cache.finalize()
        target.cache.maybe_quantize()
        # What a step computes is its output, which every cache update feeds. Only a
        # prefill without logits names the caches: mlx-lm's caches hand out their own
        # arrays as `state`, and the next step's update rewrites those in place, so
        # a step started in the background must not name them.
        if not self.stage.is_last:
            sender = self.model.model.layers[self.stage.end - 1]
            return StepWork([sender.sending], out)
        if sample:
            tokens = mx.concatenate([s(out[i : i + 1]) for i, s in enumerate(target.samplers)])
            work = StepWork([tokens])
        else:
            # Prefill: like mlx-lm, skip the logits nobody reads; an acknowledgement
            # still goes back, so rank 0 never has more steps in flight than ranks.
            tokens = mx.zeros((ids.shape[0],), dtype=mx.int32)
            work = StepWork([target.cache.state, tokens])
        if self.stage.size > 1:
            work.send = mx.distributed.send(tokens, self.stage.next_rank, group=self.group)
        return work

    # Rank 0, ring-wide.

    def shutdown(self) -> None:
        """Rank 0: release the other ranks from `follow`."""
        self.broadcast(Header(OP_STOP))

    # Other ranks.

    def follow(self) -> None:
        """Serve rank 0's messages until it says stop."""
        while True:
            header, payload = self._receive()
            if header.op == OP_STOP:
                return
            if header.op == OP_START:
                self.open(header.group, header.seq, json.loads(payload))
            elif header.op == OP_STEP:
                self._follow_step(header)
            elif header.op == OP_MERGE:
                self.merge(header.group, header.seq)
            elif header.op == OP_PREPARE:
                self.prepare(header.group, json.loads(payload))
            elif header.op == OP_LEAVE:
                self.leave(header.group, header.seq, header.length if header.flag else None)
            elif header.op == OP_EVICT:
                self.evict(header.seq)

    def _follow_step(self, header: Header) -> None:
        rows = len(self.groups[header.group].members)
        ids = mx.zeros((rows, header.length), dtype=mx.int32)
        work = self.run(header.group, ids, bool(header.flag))
        self.bell.wait()  # the previous rank's output, received in the graph
        self.complete(work)
