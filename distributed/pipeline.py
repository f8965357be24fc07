"""The ring's protocol and each rank's tables of sequence groups.

Rank 0 (see `distributed.scheduler`) decides everything and sends each decision
around the ring as a message: open a sequence, step a group, merge two groups,
prepare a group's prompts to be prefilled together, a sequence leaves, a stored
cache is evicted. Every rank applies the messages in the order they arrive, so
all ranks' tables stay alike. A step runs one group (one batch row per sequence)
through this rank's layers; the last rank sends the group's logits back to rank 0,
which samples. A step of one sequence shares the head: the last rank first sends
the head's input, and rank 0 computes half of the logits meanwhile.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from distributed.doorbell import Doorbell
from distributed.kv_cache import KVFootprint, KVSettings, StageCache, restore
from distributed.sampling import SamplingParams, TokenSampler
from distributed.shard import Stage, logits_shape, sending_layer, shared_head

OP_STOP, OP_START, OP_STEP, OP_MERGE, OP_PREPARE, OP_LEAVE, OP_EVICT = range(7)


class RequestError(ValueError):
    """Work the cluster refuses (too long for the limits); nothing was started."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


_HEADER = struct.Struct("!5i")  # op, group, seq, length, flag
SAMPLE, SHARE_HEAD = 1, 2  # STEP flags


@dataclass(frozen=True)
class Header:
    """The start of every message from rank 0.

    START: `group` and `seq` are new ids; the JSON payload is the sequence's work.
    STEP: `length` tokens per row; `flag` holds SAMPLE when the step computes
    logits, and SHARE_HEAD when rank 0 computes half of them.
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
    on a single rank), so the next rank's doorbell rings between the two; `then`,
    a second compute and send that follow (the last rank's half of a shared head)."""

    compute: list
    send: Optional[mx.array] = None
    then: Optional["StepWork"] = None


@dataclass
class Group:
    """Sequences that step together, one batch row each, in `members` order."""

    members: list[int]
    cache: StageCache
    samplers: list[TokenSampler] = field(default_factory=list)  # rank 0 only
    padded_prompt: int = 0  # tokens left of a padded prefill (see `prepare`)


@dataclass(frozen=True)
class Limits:
    """MAX_SEQUENCE_LENGTH per sequence, and the KV cache bytes KV_CACHE_RESERVED_MEMORY_MB
    gives each rank for all active sequences together; `footprints` are each rank's
    caches' cost (see `KVFootprint`)."""

    max_sequence_length: int
    kv_capacity: int
    footprints: tuple[KVFootprint, ...] = (KVFootprint(),)

    def reserve(self, prompt_tokens: int, max_tokens: int) -> int:
        """KV bytes a sequence needs on the rank where it needs most; refuses work that
        could never run."""
        total = prompt_tokens + max_tokens
        if prompt_tokens < 1:
            raise RequestError("the prompt has no tokens", "invalid_prompt")
        if total > self.max_sequence_length:
            raise RequestError(
                f"this request needs {total} tokens ({prompt_tokens} prompt + {max_tokens} "
                f"to generate) but MAX_SEQUENCE_LENGTH is {self.max_sequence_length}",
                "context_length_exceeded",
            )
        need = max(f.bytes_for(total) for f in self.footprints)
        if need > self.kv_capacity:
            raise RequestError(
                f"this request needs {need / 2**20:.1f} MiB of KV cache per rank but "
                f"KV_CACHE_RESERVED_MEMORY_MB is {self.kv_capacity / 2**20:.1f}",
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
        self.head = shared_head(model)  # rank 0 and the last rank of a ring, if it may be shared
        self.vocab, self.logits_dtype = logits_shape(model)
        self.groups: dict[int, Group] = {}
        self.stored: dict[int, list] = {}
        # Rank 0: started steps whose output is not sent yet, each with the number of
        # results expected before it, and the results due back (lists of arrays, each
        # announced by a bell), in launch order.
        self.unsent: deque[tuple[int, StepWork]] = deque()
        self.due: deque[list[mx.array]] = deque()
        self.expected = 0

    # Transport: neighbour-only, as the ring backend requires. Arrays go over MLX,
    # each announced on the next rank's doorbell, and every receive waits for that
    # first; rank 0's messages go over the doorbell's connection itself.

    def start(self, work: StepWork) -> None:
        """Rank 0: compute a step in the background; its output is sent at `flush`."""
        mx.async_eval(work.compute)
        if work.send is not None:
            self.unsent.append((self.expected, work))

    def expect(self, results: list[mx.array]) -> None:
        """Rank 0: the results of the step just started, to receive in this order."""
        self.due.append(results)
        self.expected += 1

    def flush(self) -> None:
        """Rank 0: send the outputs of started steps, each once it is computed.

        A send larger than the backend's buffers waits for its receiver, and the last
        rank sends rank 0 results as large (logits). With every rank blocked in a send
        to the next, the ring would hang, and each blocked rank holds another step: so
        before a send, rank 0 receives older results until fewer than the ranks after
        it are still due."""
        while self.unsent:
            older, work = self.unsent[0]
            if older - self._received() > self.stage.size - 2:
                self._receive_next()
            else:
                self.unsent.popleft()
                self.complete(work)

    def receive(self, results: list[mx.array]) -> None:
        """Rank 0: until `results` are in, sending the steps they come from first."""
        while any(due is results for due in self.due):
            if self.unsent and self.unsent[0][0] <= self._received():
                self.complete(self.unsent.popleft()[1])
            else:
                self._receive_next()

    def _received(self) -> int:
        return self.expected - len(self.due)

    def _receive_next(self) -> None:
        for data in self.due.popleft():
            self.arrived(data)

    def complete(self, work: Optional[StepWork]) -> None:
        """Compute a step, then send its output on (announced first)."""
        while work is not None:
            mx.eval(work.compute)
            if work.send is not None:
                self.bell.ring()
                mx.eval(work.send)
            work = work.then

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

    def receive_ack(self, rows: int) -> list[mx.array]:
        """Rank 0 of a ring: the last rank's acknowledgement of a prefill step (lazy)."""
        return [self._receive_array((rows,), mx.int32)]

    def receive_tokens(self, group: int, share: bool) -> list[mx.array]:
        """Rank 0 of a ring: what a sampling step sends back, in order (lazy); the
        last is the tokens, sampled from the logits the last rank sends. With
        `share`, the head's input comes first, and rank 0's half of the logits
        from it comes before the tokens, to compute while the last rank does the rest."""
        target = self.groups[group]
        rows, head = len(target.members), self.head
        start = head.split if share else 0
        results = []
        if share:
            hidden = self._receive_array((rows, 1, head.hidden_size), head.input_dtype)
            results.append(head.logits(hidden, 0, start))
        logits = self._receive_array((rows, 1, self.vocab - start), self.logits_dtype)
        if share:
            logits = mx.concatenate([results[0], logits], axis=-1)
        return results + [self.sample(target, logits)]

    def _receive_array(self, shape: tuple, dtype: mx.Dtype) -> mx.array:
        return mx.distributed.recv(shape, dtype, self.stage.prev_rank, group=self.group)

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
        if self.stage.is_first:
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

    def run(self, group: int, ids: mx.array, sample: bool, share: bool = False) -> StepWork:
        """Build this stage's graph for one step of `group` (ids: rows x tokens).
        With `sample`, the last stage computes the group's logits: on one rank it
        samples them, on a ring it sends them to rank 0 (only the rows after the
        head's split when `share`, after sending the head's input)."""
        target = self.groups[group]
        if self.head is not None and self.stage.is_last:
            self.head.first = self.head.split if share else 0
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
            return StepWork([sending_layer(self.model).sending], out)
        if sample and self.stage.size == 1:
            return StepWork([self.sample(target, out)])
        if sample:
            work = StepWork([out], self._send(out))
            if share:
                hidden = self.head.hidden
                work = StepWork([hidden], self._send(hidden), then=work)
            return work
        # Prefill: like mlx-lm, skip the logits nobody reads; an acknowledgement
        # still goes back, so rank 0 never has more steps in flight than ranks.
        ack = mx.zeros((ids.shape[0],), dtype=mx.int32)
        work = StepWork([target.cache.state, ack])
        if self.stage.size > 1:
            work.send = self._send(ack)
        return work

    def sample(self, target: Group, logits: mx.array) -> mx.array:
        """Rank 0: the next token of each row of a group, from its logits."""
        return mx.concatenate([s(logits[i : i + 1]) for i, s in enumerate(target.samplers)])

    def _send(self, data: mx.array) -> mx.array:
        return mx.distributed.send(data, self.stage.next_rank, group=self.group)

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
        work = self.run(header.group, ids, bool(header.flag & SAMPLE), bool(header.flag & SHARE_HEAD))
        self.bell.wait()  # the previous rank's output, received in the graph
        self.complete(work)
