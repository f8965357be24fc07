"""Rank 0's scheduler: continuous batching, with micro-batches in flight around the ring.

Active sequences are split into up to MICRO_BATCHES decode groups (by default
one per machine); every group has at most one step in flight, and up to that many
steps are in flight in all, so under load each machine works on a different group
at once. Ranks that share a machine share its cores: there, one step at a time
lets each rank compute on all of them while the others sleep. New sequences are
prefilled in chunks between other groups' steps: prompts that arrive together go
through as one group, right-padded to one length as mlx-lm's batch generator does,
while a chunk of them all fits in PREFILL_STEP_SIZE tokens; a long prompt goes
alone. A prefilled group then joins the smallest decode group (mlx-lm's batch
caches take its sequences as new rows).
A group's next step is built on its tokens before they arrive; a sequence that
ended meanwhile rides along that one step and leaves after it.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional

import mlx.core as mx

from distributed.kv_cache import can_batch, can_reuse_prefixes
from distributed.pipeline import (
    OP_EVICT,
    OP_LEAVE,
    OP_MERGE,
    OP_PREPARE,
    OP_START,
    OP_STEP,
    SAMPLE,
    SHARE_HEAD,
    Header,
    Limits,
    Pipeline,
    StepWork,
)
from distributed.prompt_cache import PromptCacheIndex
from distributed.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    """One sequence as rank 0 tracks it."""

    group: int
    tokens: list[int]  # the prompt, then every token generated
    prompt_tokens: int
    max_tokens: int
    reserved: int  # KV tokens held for it
    cached: int  # prompt tokens taken from the prompt cache
    fed: int  # tokens the model has been given
    finished: bool = False
    left: bool = False

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_tokens


@dataclass
class Batch:
    """Rank 0's view of a group."""

    group: int
    members: list[int]
    decoding: bool = False
    work: Optional[StepWork] = None  # its next decode step, built ahead


@dataclass
class Flight:
    """A launched step whose tokens (or acknowledgement) are on their way back."""

    group: int
    members: list[int]
    results: list[mx.array]  # on a ring, what comes back, in order; the tokens last
    sample: bool


class Scheduler:
    def __init__(
        self,
        pipeline: Pipeline,
        limits: Limits,
        prefill_step_size: int,
        prompt_cache_tokens: int,
        micro_batches: int = 1,
        eos_token_ids: frozenset[int] = frozenset(),
    ):
        self.pipeline = pipeline
        self.eos_token_ids = eos_token_ids
        self.limits = limits
        self.prefill_step_size = prefill_step_size
        self.max_in_flight = micro_batches
        # Without batch caches (quantized KV), every sequence is a group of its own.
        self.max_groups = micro_batches if can_batch(pipeline.model, pipeline.kv) else None
        self.prompt_cache: Optional[PromptCacheIndex] = None
        if prompt_cache_tokens > 0 and can_reuse_prefixes(pipeline.model, pipeline.kv):
            self.prompt_cache = PromptCacheIndex(prompt_cache_tokens)
        self.sequences: dict[int, Sequence] = {}
        self.batches: dict[int, Batch] = {}
        self.ready: deque[int] = deque()  # groups to launch, in turn
        self.waiting: list[int] = []  # prefilled groups of one, to merge into a decode group
        self.flights: deque[Flight] = deque()
        self.reserved = 0
        self._next_id = 0
        self.prefill_budget = prefill_step_size  # prompt tokens allowed before the next decode step

    @property
    def busy(self) -> bool:
        return bool(self.batches or self.flights)

    @property
    def active(self) -> int:
        """Sequences holding KV cache on the ring."""
        return sum(not s.left for s in self.sequences.values())

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a request's KV reservation fits now; RequestError if it never will."""
        return self.reserved + self.limits.reserve(prompt_tokens, max_tokens) <= self.limits.kv_capacity

    def submit(self, prompt: list[int], params: SamplingParams, max_tokens: int) -> int:
        """Start a sequence; its tokens come out of `step`. Returns its id."""
        reserved = self.limits.reserve(len(prompt), max_tokens)
        reuse = self.prompt_cache.lookup(prompt) if self.prompt_cache else None
        seq = group = self._next_id
        self._next_id += 1
        work = {
            "prompt": prompt,
            "params": params.model_dump(),
            "reuse": [reuse.entry, reuse.tokens] if reuse else None,
        }
        payload = json.dumps(work).encode()
        self.pipeline.broadcast(Header(OP_START, group, seq), payload)
        self.pipeline.open(group, seq, work)
        cached = reuse.tokens if reuse else 0
        self.sequences[seq] = Sequence(group, list(prompt), len(prompt), max_tokens, reserved, cached, cached)
        self.batches[group] = Batch(group, [seq])
        self._requeue(self.batches[group])
        self.reserved += reserved
        return seq

    def finish(self, seq: int) -> None:
        """No more tokens wanted for `seq` (stop, cancel); it leaves its group
        before that group's next step or right after it."""
        sequence = self.sequences.get(seq)
        if sequence is None:
            return
        sequence.finished = True
        if sequence.left:
            del self.sequences[seq]

    def step(self) -> list[tuple[int, int]]:
        """Launch what may go, then wait for the oldest step in flight; returns
        the (sequence, token) pairs it produced."""
        self.launch()
        return self.collect()

    def launch(self) -> None:
        """Start every step that may go; they compute while the caller goes on."""
        self._promote_waiting()
        while len(self.flights) < self.max_in_flight and (batch := self._next_to_launch()) is not None:
            self._launch(batch)

    def collect(self) -> list[tuple[int, int]]:
        """Wait for the oldest step in flight; returns the (sequence, token) pairs it
        produced. A sequence that drew an end-of-sequence token is finished here,
        so the next launch leaves it out."""
        return self._collect() if self.flights else []

    def generate(self, prompt: list[int], params: SamplingParams, max_tokens: int) -> Iterator[int]:
        """One sequence's tokens; the caller stops early by closing the generator."""
        seq = self.submit(prompt, params, max_tokens)
        try:
            while seq in self.sequences and not self.sequences[seq].finished:
                for produced, token in self.step():
                    if produced == seq:
                        yield token
        finally:
            self.finish(seq)

    def drain(self) -> None:
        """Wait for every step in flight (before stopping or idling the ring)."""
        while self.flights:
            self._collect()

    def shutdown(self) -> None:
        """Release the other ranks, once nothing is in flight."""
        self.drain()
        self.pipeline.shutdown()

    # Launching steps.

    def _next_to_launch(self) -> Optional[Batch]:
        """Between two decode steps, prompt chunks of up to PREFILL_STEP_SIZE
        tokens in all, so running streams keep flowing while new prompts are
        prefilled; prompts go first come, first served."""
        self.ready = deque(g for g in self.ready if g in self.batches)  # groups that left
        ready = [self.batches[g] for g in self.ready]
        decoding = next((b for b in ready if b.decoding), None)
        prefilling = min((b for b in ready if not b.decoding), key=lambda b: b.group, default=None)
        batch = prefilling if prefilling is not None and (self.prefill_budget > 0 or decoding is None) else decoding
        if batch is not None:
            self.ready.remove(batch.group)
            if batch is prefilling and self._unstarted(batch):
                self._gather_prompts(batch)
        return batch

    def _remaining_prompt(self, seq: int) -> int:
        """Prompt tokens still to prefill (the last one goes through the first decode step)."""
        sequence = self.sequences[seq]
        return sequence.prompt_tokens - 1 - sequence.fed

    def _unstarted(self, batch: Batch) -> bool:
        """A lone sequence none of whose prompt has been prefilled yet."""
        if len(batch.members) != 1 or batch.decoding:
            return False
        sequence = self.sequences[batch.members[0]]
        return sequence.fed == sequence.cached and not sequence.finished

    def _gather_prompts(self, batch: Batch) -> None:
        """Merge into `batch` the other prompts waiting to start, first come first
        served, while one chunk of them all (padding included) fits in
        PREFILL_STEP_SIZE tokens; then tell every rank how they are padded."""
        if self.max_groups is None:
            return  # no batch caches
        longest = self._remaining_prompt(batch.members[0])
        for group in sorted(self.ready):
            other = self.batches[group]
            if not self._unstarted(other):
                continue
            remaining = self._remaining_prompt(other.members[0])
            if (len(batch.members) + 1) * min(self.prefill_step_size, max(longest, remaining)) > self.prefill_step_size:
                break
            longest = max(longest, remaining)
            self.ready.remove(group)
            self._merge(batch, other)
        if len(batch.members) == 1:
            return
        lengths = [self._remaining_prompt(s) for s in batch.members]
        padding = {"lengths": lengths, "right_padding": [max(lengths) - n for n in lengths]}
        payload = json.dumps(padding).encode()
        self.pipeline.broadcast(Header(OP_PREPARE, batch.group), payload)
        self.pipeline.prepare(batch.group, padding)
        log.info("prefilling %d prompts together (%s tokens)", len(lengths), ", ".join(map(str, lengths)))

    def _launch(self, batch: Batch) -> None:
        if all(self.sequences[s].finished for s in batch.members):
            # Nobody wants this step: drop the group (and any step built ahead) unlaunched.
            for seq in list(batch.members):
                self._leave(batch, seq)
            return
        if batch.decoding:
            work = batch.work or self._decode_step(batch, self._next_inputs(batch.members))
            length, sample = 1, True
            for seq in batch.members:
                self.sequences[seq].fed += 1
            self.prefill_budget = self.prefill_step_size
        else:
            work, length = self._prefill_step(batch)
            sample = False
        ring = self.pipeline.stage.size > 1
        # Exactly one row: its half-head logits are the same bits as the whole
        # head's, which a BLAS may not give for a batch split across ranks.
        share = ring and sample and len(batch.members) == 1
        flag = (SAMPLE if sample else 0) | (SHARE_HEAD if share else 0)
        self.pipeline.broadcast(Header(OP_STEP, batch.group, length=length, flag=flag))
        # As in mlx-lm: the device computes while the next step's graph is built.
        self.pipeline.start(work)
        if not ring:
            results = [work.compute[-1]]
        elif sample:
            results = self.pipeline.receive_tokens(batch.group, share)
        else:
            results = self.pipeline.receive_ack(len(batch.members))
        if ring:
            self.pipeline.expect(results)
        tokens = results[-1]
        self.flights.append(Flight(batch.group, list(batch.members), results, sample))
        batch.work = None
        if batch.decoding:
            self._regroup(batch, tokens)

    def _prefill_step(self, batch: Batch) -> tuple[StepWork, int]:
        """The next chunk of the prompts but their last tokens, chunked as mlx-lm's
        generate_step does so that outputs match it exactly; shorter prompts of a
        group are right-padded. The last prompt token goes through the sequence's
        first decode step, which samples."""
        sequences = [self.sequences[s] for s in batch.members]
        todo = [s.tokens[s.fed : s.prompt_tokens - 1] for s in sequences]
        count = min(self.prefill_step_size, max(len(t) for t in todo))
        rows = []
        for sequence, tokens in zip(sequences, todo):
            chunk = tokens[:count]
            sequence.fed += len(chunk)
            rows.append(chunk + [0] * (count - len(chunk)))
        self.prefill_budget -= count * len(rows)
        return self.pipeline.run(batch.group, mx.array(rows, dtype=mx.int32), False), count

    def _next_inputs(self, members: list[int]) -> mx.array:
        """Each sequence's next token to feed, one row each."""
        return mx.array([self.sequences[s].tokens[self.sequences[s].fed] for s in members], dtype=mx.int32)

    def _decode_step(self, batch: Batch, inputs: mx.array) -> StepWork:
        return self.pipeline.run(batch.group, inputs[:, None], True)

    def _regroup(self, batch: Batch, pending: mx.array) -> None:
        """Right after a decode step of `batch` went out: sequences whose last
        token it computes, or that ended, leave; waiting ones join; then the
        next step is built on the pending tokens."""
        rows = list(batch.members)
        done = [
            s for s in rows
            if self.sequences[s].finished or self.sequences[s].generated + 1 >= self.sequences[s].max_tokens
        ]
        for seq in done:
            self._leave(batch, seq)
        if not batch.members:
            return  # waiting groups take its place as decode groups of their own
        kept = [i for i, s in enumerate(rows) if s not in done]
        joining = self._absorb(batch) if self._is_smallest(batch) else []
        parts = []
        if kept:
            parts.append(pending if len(kept) == len(rows) else pending[mx.array(kept)])
        if joining:
            parts.append(self._next_inputs(joining))
        batch.work = self._decode_step(batch, mx.concatenate(parts) if len(parts) > 1 else parts[0])

    # Group membership.

    def _decode_groups(self) -> list[Batch]:
        return [b for b in self.batches.values() if b.decoding and b.group not in self.waiting]

    def _is_smallest(self, batch: Batch) -> bool:
        return bool(self.waiting) and len(batch.members) <= min(len(b.members) for b in self._decode_groups())

    def _absorb(self, batch: Batch) -> list[int]:
        """Merge every waiting group into `batch`; returns the sequences that joined."""
        joined = []
        for group in self.waiting:
            waiting = self.batches[group]
            for seq in [s for s in waiting.members if self.sequences[s].finished]:
                self._leave(waiting, seq)
            if waiting.members:
                joined += waiting.members
                self._merge(batch, waiting)
        self.waiting.clear()
        return joined

    def _merge(self, batch: Batch, other: Batch) -> None:
        """The sequences of `other` join `batch` as new rows, on every rank."""
        self.pipeline.broadcast(Header(OP_MERGE, batch.group, other.group))
        self.pipeline.merge(batch.group, other.group)
        for seq in other.members:
            self.sequences[seq].group = batch.group
        batch.members += other.members
        del self.batches[other.group]

    def _promote_waiting(self) -> None:
        """Waiting groups become decode groups of their own while there is room."""
        while self.waiting and (self.max_groups is None or len(self._decode_groups()) < self.max_groups):
            self.ready.append(self.waiting.pop(0))

    def _leave(self, batch: Batch, seq: int) -> None:
        """`seq` leaves its group on every rank; what it computed is kept in
        the prompt cache when that is on."""
        sequence = self.sequences[seq]
        entry, evicted = None, []
        # A row of a padded prefill still under way holds padding, not just its tokens.
        padded = not batch.decoding and len(batch.members) > 1
        if self.prompt_cache is not None and sequence.fed > 0 and not padded:
            entry, evicted = self.prompt_cache.insert(sequence.tokens[: sequence.fed])
        flag = int(entry is not None)
        self.pipeline.broadcast(Header(OP_LEAVE, batch.group, seq, entry or 0, flag))
        self.pipeline.leave(batch.group, seq, entry)
        for old in evicted:
            self.pipeline.broadcast(Header(OP_EVICT, seq=old))
            self.pipeline.evict(old)
        batch.members.remove(seq)
        if not batch.members:
            del self.batches[batch.group]
        self.reserved -= sequence.reserved
        sequence.left = True
        if sequence.finished:
            del self.sequences[seq]

    # Collecting results.

    def _collect(self) -> list[tuple[int, int]]:
        flight = self.flights.popleft()
        if self.pipeline.stage.size > 1:
            self.pipeline.receive(flight.results)
            self.pipeline.flush()  # the next rank may be waiting for a step started since
        values = flight.results[-1].tolist()
        events = []
        if flight.sample:
            for seq, token in zip(flight.members, values):
                sequence = self.sequences.get(seq)
                if sequence is None or sequence.finished:
                    continue  # a row that rode along after its sequence ended
                sequence.tokens.append(token)
                events.append((seq, token))
                if sequence.generated >= sequence.max_tokens or token in self.eos_token_ids:
                    self.finish(seq)
        batch = self.batches.get(flight.group)
        if batch is not None:
            self._requeue(batch)
        return events

    def _prefilled(self, batch: Batch) -> bool:
        return all(self._remaining_prompt(s) <= 0 for s in batch.members)

    def _requeue(self, batch: Batch) -> None:
        if not batch.decoding and self._prefilled(batch):
            batch.decoding = True
            others = len(self._decode_groups()) - 1
            if self.max_groups is not None and others >= self.max_groups:
                self.waiting.append(batch.group)
                return
        self.ready.append(batch.group)
