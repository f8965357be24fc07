"""Pipelined generation around the ring.

Rank 0 embeds and runs the first layers, each rank passes the hidden state to
the next, the last rank samples and sends the token ids back to rank 0. Every
message starts with a small header; the per-sequence table on each rank is
keyed by the header's sequence id, so batching can grow from here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from distributed.kv_cache import KVSettings, StageCache
from distributed.sampling import SamplingParams, TokenSampler
from distributed.shard import Stage

log = logging.getLogger(__name__)

OP_STOP, OP_IDLE, OP_START, OP_STEP, OP_END = range(5)


class RequestError(ValueError):
    """Work the cluster refuses (too long for the limits); nothing was started."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Header:
    """Sent ahead of every message. `length` is tokens for STEP, payload bytes
    for START and milliseconds for IDLE."""

    op: int
    seq: int = 0
    length: int = 0
    sample: int = 0

    def encode(self) -> mx.array:
        return mx.array([self.op, self.seq, self.length, self.sample], dtype=mx.int32)

    @classmethod
    def decode(cls, data: mx.array) -> "Header":
        return cls(*data.tolist())


HEADER_SHAPE = (4,)


# Share of an expected wait for a neighbour spent asleep; the rest busy-polls.
NAP_SHARE = 0.95
# A wait shorter than this after a nap means the data was already there: we overslept.
OVERSLEPT = 0.0005


class Nap:
    """Sleeps through most of a predictable wait for a neighbour rank. Both MLX
    backends busy-poll a pending receive, and a polling rank takes the core that
    the computing rank's second thread would otherwise use."""

    def __init__(self):
        self.expected = 0.0

    def sleep(self) -> float:
        slept = NAP_SHARE * self.expected
        if slept > 0:
            time.sleep(slept)
        return slept

    def wait(self, arrival: mx.array, slept: float) -> None:
        """Wait for a pending receive and learn how long the whole wait was."""
        start = time.perf_counter()
        mx.eval(arrival)
        residual = time.perf_counter() - start
        # Overslept: by how much is unknown, so back off.
        self.expected = slept * NAP_SHARE**4 if slept and residual < OVERSLEPT else slept + residual


@dataclass
class Sequence:
    """One active sequence on this rank."""

    cache: StageCache
    sampler: Optional[TokenSampler]


@dataclass(frozen=True)
class Limits:
    """Per-sequence token limits: MAX_SEQUENCE_LENGTH and what the KV budget holds."""

    max_sequence_length: int
    kv_capacity: Optional[int] = None

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        total = prompt_tokens + max_tokens
        if prompt_tokens < 1:
            raise RequestError("the prompt has no tokens", "invalid_prompt")
        if total > self.max_sequence_length:
            raise RequestError(
                f"this request needs {total} tokens ({prompt_tokens} prompt + {max_tokens} "
                f"to generate) but MAX_SEQUENCE_LENGTH is {self.max_sequence_length}",
                "context_length_exceeded",
            )
        if self.kv_capacity is not None and total > self.kv_capacity:
            raise RequestError(
                f"this request needs {total} tokens of KV cache but "
                f"KV_CACHE_RESERVED_MEMORY_MB holds {self.kv_capacity} tokens per sequence",
                "kv_cache_exceeded",
            )


class Pipeline:
    """This rank's part of the ring: rank 0 calls `generate`, the others `follow`."""

    def __init__(
        self,
        model: nn.Module,
        stage: Stage,
        group: mx.distributed.Group,
        kv: KVSettings,
        prefill_step_size: int,
        limits: Limits,
    ):
        self.model = model
        self.stage = stage
        self.group = group
        self.kv = kv
        self.prefill_step_size = prefill_step_size
        self.limits = limits
        self.sequences: dict[int, Sequence] = {}
        self._next_seq = 0
        self.nap = Nap()

    # Transport: neighbour-only, as the ring backend requires.

    def _send(self, data: mx.array, dst: int) -> None:
        mx.eval(mx.distributed.send(data, dst, group=self.group))

    def _recv(self, shape: tuple, dtype: mx.Dtype, src: int) -> mx.array:
        data = mx.distributed.recv(shape, dtype, src, group=self.group)
        mx.eval(data)
        return data

    def _broadcast(self, header: Header, payload: bytes = b"") -> None:
        """Rank 0: start a message around the ring."""
        if self.stage.size == 1:
            return
        self._send(header.encode(), self.stage.next_rank)
        if payload:
            self._send(mx.array(np.frombuffer(payload, dtype=np.uint8)), self.stage.next_rank)

    def _receive(self) -> tuple[Header, bytes]:
        """Other ranks: take the next message and pass it on (the last rank doesn't)."""
        raw = self._recv(HEADER_SHAPE, mx.int32, self.stage.prev_rank)
        header = Header.decode(raw)
        forward = not self.stage.is_last
        if forward:
            self._send(raw, self.stage.next_rank)
        payload = b""
        if header.op == OP_START:
            data = self._recv((header.length,), mx.uint8, self.stage.prev_rank)
            if forward:
                self._send(data, self.stage.next_rank)
            payload = bytes(memoryview(data))
        return header, payload

    # The per-sequence table.

    def _open(self, seq: int, work: dict) -> None:
        sampler = None
        if self.stage.is_last:
            sampler = TokenSampler(SamplingParams.pick(work["params"]), work["prompt"])
        cache = StageCache(self.model, self.stage.start, self.stage.end, self.kv)
        self.sequences[seq] = Sequence(cache, sampler)

    def _close(self, seq: int) -> None:
        self.sequences.pop(seq, None)

    def _run(self, header: Header, ids: mx.array) -> list:
        """Build this stage's graph for one step; returns what to evaluate. The
        last stage samples when asked to; its token (last in the list) also goes
        to rank 0 when that is another rank."""
        seq = self.sequences[header.seq]
        out = self.model(ids[None], cache=seq.cache.view())
        seq.cache.maybe_quantize()
        if not (self.stage.is_last and header.sample):
            # Prefill on the last stage: like mlx-lm, skip the logits nobody reads.
            return [seq.cache.state] if self.stage.is_last else [out, seq.cache.state]
        token = seq.sampler(out)
        if self.stage.size > 1:
            token = mx.distributed.send(token, self.stage.next_rank, group=self.group)
        return [seq.cache.state, token]

    # Rank 0.

    def _step(self, seq: int, tokens: list[int], sample: bool) -> Optional[int]:
        """One step, waited for: prompt chunks and the first token."""
        header = Header(OP_STEP, seq, len(tokens), int(sample))
        self._broadcast(header)
        work = self._run(header, mx.array(tokens, dtype=mx.int32))
        mx.eval(work)
        if not sample:
            return None
        if self.stage.size > 1:
            return self._recv((1,), mx.int32, self.stage.prev_rank).item()
        return work[-1].item()

    def _decode_alone(self, seq: int, first: int, max_tokens: int) -> Iterator[int]:
        """A group of one: as in mlx-lm, the next step runs while the caller
        handles this token."""
        header = Header(OP_STEP, seq, 1, 1)
        token = mx.array([first], dtype=mx.int32)
        in_flight = None
        try:
            for produced in range(1, max_tokens + 1):
                if produced < max_tokens:
                    in_flight = self._run(header, token)
                    mx.async_eval(in_flight)
                yield token.item()
                token, in_flight = (in_flight[-1] if in_flight else None), None
        finally:
            if in_flight is not None:
                mx.eval(in_flight)

    def _decode_ring(self, seq: int, first: int, max_tokens: int) -> Iterator[int]:
        """Rank 0 of a ring. A step's graph is built on its input token before
        that token arrives, and rank 0 naps through most of the wait, so the only
        work on the critical path is MLX's own. (MLX evaluates distributed ops
        synchronously, so the step cannot be queued ahead as mlx-lm does.)"""
        header = Header(OP_STEP, seq, 1, 1)
        self.nap.expected = 0.0
        work = self._run(header, mx.array([first], dtype=mx.int32)) if max_tokens > 1 else None
        yield first
        for produced in range(2, max_tokens + 1):
            self._send(header.encode(), self.stage.next_rank)
            mx.eval(work)
            token = mx.distributed.recv((1,), mx.int32, self.stage.prev_rank, group=self.group)
            work = self._run(header, token) if produced < max_tokens else None
            self.nap.wait(token, self.nap.sleep())
            yield token.item()

    def generate(
        self, prompt: list[int], params: SamplingParams, max_tokens: int
    ) -> Iterator[int]:
        """Yield up to `max_tokens` token ids; the caller stops early (EOS, stop
        strings, cancel) by closing the generator."""
        self.limits.check(len(prompt), max_tokens)
        seq = self._next_seq
        self._next_seq += 1
        work = {"prompt": prompt, "params": params.to_dict()}
        payload = json.dumps(work).encode()
        self._broadcast(Header(OP_START, seq, len(payload)), payload)
        self._open(seq, work)
        try:
            rest = prompt
            # Same chunking as mlx-lm's generate_step, so outputs match it exactly.
            while len(rest) > 1:
                n = min(self.prefill_step_size, len(rest) - 1)
                self._step(seq, rest[:n], sample=False)
                rest = rest[n:]
            first = self._step(seq, rest, sample=True)
            decode = self._decode_ring if self.stage.size > 1 else self._decode_alone
            yield from decode(seq, first, max_tokens)
        finally:
            self._broadcast(Header(OP_END, seq))
            self._close(seq)

    def idle(self, seconds: float) -> None:
        """Rank 0 with no work: tell the others to sleep rather than wait in a
        receive, which both MLX backends busy-poll. The last rank acknowledges,
        so idle messages never pile up behind a sleeping rank."""
        self._broadcast(Header(OP_IDLE, length=int(seconds * 1000)))
        if self.stage.size > 1:
            self._recv((1,), mx.int32, self.stage.prev_rank)

    def shutdown(self) -> None:
        """Rank 0: release the other ranks from `follow`."""
        self._broadcast(Header(OP_STOP))

    # Other ranks.

    def follow(self) -> None:
        """Serve rank 0's messages until it says stop."""
        while True:
            header, payload = self._receive()
            if header.op == OP_STOP:
                return
            if header.op == OP_IDLE:
                if self.stage.is_last:
                    self._send(mx.array([header.op], dtype=mx.int32), self.stage.next_rank)
                time.sleep(header.length / 1000)
            elif header.op == OP_START:
                self._open(header.seq, json.loads(payload))
                self.nap.expected = 0.0
            elif header.op == OP_STEP:
                work = self._run(header, mx.zeros((header.length,), dtype=mx.int32))
                if header.length == 1:
                    # Decode: a steady wait for the previous rank, worth napping through.
                    receiver = self.model.model.layers[self.stage.start]
                    self.nap.wait(receiver.received, self.nap.sleep())
                mx.eval(work)
            elif header.op == OP_END:
                self._close(header.seq)
