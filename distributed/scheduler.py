"""Rank 0's scheduler: continuous batching, with micro-batches in flight around the ring.

A micro-batch is the sequences rank 0 steps around the ring together; on every rank
it is one batch of the table (`distributed.batch_table`), under the same id. Active
sequences are split into up to MICRO_BATCHES decoding micro-batches (by default one
per machine); each has at most one step in flight, and up to that many steps are in
flight in all, so under load each machine works on a different micro-batch at once.
Ranks that share a machine share its cores: there, one step at a time lets each rank
compute on all of them while the others sleep. New sequences are prefilled in chunks
between other micro-batches' steps: prompts that arrive together go through as one
micro-batch, right-padded to one length as mlx-lm's batch generator does, while a
chunk of them all fits in PREFILL_STEP_SIZE tokens; a long prompt goes alone. On a
ring of several stages with several steps in flight, a prompt's chunks follow each
other around it (`distributed.prefill`). A prefilled micro-batch then joins the
smallest decoding one (mlx-lm's batch caches take its sequences as new rows).
A micro-batch's next step is built on its tokens before they arrive; a sequence that
ended meanwhile rides along that one step and leaves after it. A sequence decoding
alone may speculate instead (`distributed.speculation`): its next step, built once its
tokens are in, verifies proposals too, and the positions it rejects are trimmed from
every rank's caches; with more sequences active, speculation waits.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from typing import Iterator, Optional

import mlx.core as mx

from distributed.kv_cache import can_batch, can_reuse_prefixes
from distributed.limits import Limits, RequestError
from distributed.micro_batch import Flight, MicroBatch
from distributed.messages import SAMPLE, Header, Op
from distributed.pipeline import Pipeline
from distributed.prefill import Prefill, prefill_chunk
from distributed.prompt_cache import PromptCacheIndex
from distributed.constraint import Grammars
from distributed.sampling import SamplingParams, check_sampling
from distributed.sequence import Sequence, TokenResult
from distributed.speculation import Speculation
from distributed.transport import StepWork

log = logging.getLogger(__name__)


class Scheduler(Prefill):
    def __init__(
        self,
        pipeline: Pipeline,
        limits: Limits,
        prefill_step_size: int,
        prompt_cache_tokens: int,
        micro_batches: int = 1,
        pipeline_prefill_step_size: int = 0,
        eos_token_ids: frozenset[int] = frozenset(),
        vocab_size: Optional[int] = None,
        grammars: Optional[Grammars] = None,
        speculation: Optional[Speculation] = None,
    ):
        self.pipeline = pipeline
        self.transport = pipeline.transport
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.grammars = grammars
        self.speculation = speculation
        self.limits = limits
        self.prefill_step_size = prefill_step_size
        self.max_in_flight = micro_batches
        self.prefill_chunk = prefill_chunk(prefill_step_size, pipeline_prefill_step_size,
                                           pipeline.results_over_ring and micro_batches > 1)
        # Without batch caches (quantized KV), every sequence is a micro-batch of its own.
        self.max_decoding = micro_batches if can_batch(pipeline.model, pipeline.kv) else None
        self.prompt_cache: Optional[PromptCacheIndex] = None
        if prompt_cache_tokens > 0 and can_reuse_prefixes(pipeline.model, pipeline.kv):
            self.prompt_cache = PromptCacheIndex(prompt_cache_tokens)
        self.sequences: dict[int, Sequence] = {}
        self.micro_batches: dict[int, MicroBatch] = {}
        self.ready: deque[int] = deque()  # micro-batches to launch, in turn
        self.waiting: list[int] = []  # prefilled micro-batches, to merge into a decoding one
        self.flights: deque[Flight] = deque()
        self.reserved = 0
        self._next_id = 0
        self.prefill_budget = prefill_step_size  # prompt tokens allowed before the next decode step

    @property
    def busy(self) -> bool:
        return bool(self.micro_batches or self.flights)

    @property
    def active(self) -> int:
        """Sequences holding KV cache on the ring."""
        return sum(not s.left for s in self.sequences.values())

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a request's KV reservation fits now; RequestError if it never will."""
        return self.reserved + self.limits.reserve(prompt_tokens, max_tokens) <= self.limits.kv_capacity

    def submit(self, prompt: list[int], params: SamplingParams, max_tokens: int, drawn: int = 0,
               grammar: Optional[str] = None, logprobs: Optional[int] = None, background: bool = False) -> int:
        """Start a sequence; its tokens come out of `step`. Returns its id. `drawn`: the
        tokens at the end of `prompt` it generated before a restart (`max_tokens`
        counts those still to draw); `grammar`: what its output must follow; `logprobs`:
        each token's log-probability wanted, with that many top alternatives;
        `background`: a batch line, whose prompt is prefilled after interactive ones."""
        reserved = self.limits.reserve(len(prompt), max_tokens)
        try:
            if self.vocab_size is not None:
                check_sampling(params, self.vocab_size)
            constraint = self.grammars.constraint(grammar, prompt[len(prompt) - drawn:]) if grammar else None
        except ValueError as err:
            raise RequestError(str(err), "invalid_sampling") from None
        reuse = self.prompt_cache.lookup(prompt) if self.prompt_cache else None
        seq = batch = self._next_id
        self._next_id += 1
        work = {
            "prompt": prompt,
            "params": params.model_dump(),
            "drawn": drawn,
            "reuse": [reuse.entry, reuse.tokens] if reuse else None,
        }
        self.pipeline.tell(Header(Op.START, batch, seq), json.dumps(work).encode())
        sampler = self.pipeline.table.batches[batch].samplers[0]
        sampler.constraint = constraint
        if logprobs is not None:
            sampler.logprob_log, sampler.top_logprobs = deque(), logprobs
        cached = reuse.tokens if reuse else 0
        self.sequences[seq] = Sequence(seq, batch, list(prompt), len(prompt), max_tokens, reserved, cached, cached,
                                       constraint=constraint, logprob_log=sampler.logprob_log,
                                       background=background)
        self.micro_batches[batch] = MicroBatch(batch, [seq])
        self._requeue(self.micro_batches[batch])
        self.reserved += reserved
        return seq

    def finish(self, seq: int) -> None:
        """No more tokens wanted for `seq` (stop, cancel); it leaves its
        micro-batch before that one's next step or right after it."""
        sequence = self.sequences.get(seq)
        if sequence is None:
            return
        sequence.finished = True
        if sequence.left:
            del self.sequences[seq]

    def step(self) -> list[TokenResult]:
        """Launch what may go, then wait for the oldest step in flight; returns
        the tokens it produced."""
        self.launch()
        return self.collect()

    def launch(self) -> None:
        """Start every step that may go; they compute while the caller goes on."""
        self._promote_waiting()
        while len(self.flights) < self.max_in_flight and (micro := self._next_to_launch()) is not None:
            self._launch(micro)

    def collect(self) -> list[TokenResult]:
        """Wait for the oldest step in flight; returns the tokens it produced. A
        sequence whose token ends it (`Sequence.draw`) is finished here, so the next
        launch leaves it out."""
        return self._collect() if self.flights else []

    def generate(self, prompt: list[int], params: SamplingParams, max_tokens: int) -> Iterator[TokenResult]:
        """One sequence's tokens, the last with its finish reason; the caller stops
        early by closing the generator."""
        seq = self.submit(prompt, params, max_tokens)
        try:
            while seq in self.sequences and not self.sequences[seq].finished:
                yield from (result for result in self.step() if result.seq == seq)
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

    def _next_to_launch(self) -> Optional[MicroBatch]:
        """Between two decode steps, prompt chunks of up to PREFILL_STEP_SIZE
        tokens in all, so running streams keep flowing while new prompts are
        prefilled; prompts go first come, first served."""
        self.ready = deque(g for g in self.ready if g in self.micro_batches)  # those that left
        ready = [self.micro_batches[g] for g in self.ready]
        decoding = next((b for b in ready if b.decoding and not self._yields(b)), None)
        prefilling = min((b for b in ready if not b.decoding), key=self._prefill_order, default=None)
        micro = prefilling if prefilling is not None and (self.prefill_budget > 0 or decoding is None) else decoding
        if micro is not None:
            self.ready.remove(micro.batch)
            if micro is prefilling and self._unstarted(micro):
                self._gather_prompts(micro)
        return micro

    def _launch(self, micro: MicroBatch) -> None:
        if all(self.sequences[s].finished for s in micro.members):
            # Nobody wants this step: drop the micro-batch (and any step built ahead) unlaunched.
            for seq in list(micro.members):
                self._leave(micro, seq)
            return
        drafts = []
        if micro.decoding:
            if micro.work is None and self._is_smallest(micro):
                self._absorb(micro)  # prompts prefilled since the last step join this one
            if micro.work is None and self._may_speculate(micro):
                drafts = self.speculation.propose(self.sequences[micro.members[0]])
            work = micro.work or self._decode_step(micro, self._next_inputs(micro.members), drafts)
            length, sample = 1 + len(drafts), True
            for seq in micro.members:
                self.sequences[seq].fed += length
            self.prefill_budget = self.prefill_step_size
        else:
            work, length = self._prefill_step(micro)
            sample = False
        ring = self.pipeline.results_over_ring
        self.transport.broadcast(Header(Op.STEP, micro.batch, length=length, flag=SAMPLE if sample else 0))
        # As in mlx-lm: the device computes while the next step's graph is built.
        self.transport.start(work)
        if not ring:
            results = [work.compute[-1]]
        elif sample:
            fed_after = mx.array([drafts], mx.int32) if drafts else mx.zeros((len(micro.members), 0), mx.int32)
            results = self.pipeline.receive_tokens(micro.batch, fed_after)
        else:
            results = self.pipeline.receive_ack(len(micro.members))
        if ring:
            self.transport.expect(results)
        tokens = results[-1]
        self.flights.append(Flight(micro.batch, list(micro.members), results, sample, drafts))
        micro.work = None
        if not micro.decoding and not self._prefilled(micro):
            self.ready.append(micro.batch)  # its next chunk may follow this one at once (`Prefill`)
        if micro.decoding and not self._may_speculate(micro):
            self._build_ahead(micro, tokens)

    def _next_inputs(self, members: list[int]) -> mx.array:
        """Each sequence's next token to feed, one row each."""
        return mx.array([self.sequences[s].tokens[self.sequences[s].fed] for s in members], dtype=mx.int32)

    def _decode_step(self, micro: MicroBatch, inputs: mx.array, drafts: list[int] = ()) -> StepWork:
        """One token a row; with `drafts`, the micro-batch's one row verifies them too."""
        ids = mx.concatenate([inputs, mx.array(drafts, dtype=mx.int32)])[None] if drafts else inputs[:, None]
        return self.pipeline.run(micro.batch, ids, True)

    def _may_speculate(self, micro: MicroBatch) -> bool:
        """Whether `micro`'s next step may verify proposals: a sequence decoding alone,
        free of a grammar (whose mask needs each token before the next)."""
        if self.speculation is None or self.active > 1 or len(micro.members) != 1:
            return False
        return self.sequences[micro.members[0]].constraint is None

    def speculation_record(self) -> Optional[dict]:
        """SPECULATION's state and figures for rank 0's heartbeat (None when off)."""
        return self.speculation.record(self.active) if self.speculation else None

    def _build_ahead(self, micro: MicroBatch, pending: mx.array) -> None:
        """Right after a decode step of `micro` went out: sequences whose last
        token it computes, or that ended, leave; waiting ones join; then the
        next step is built on the pending tokens."""
        rows = list(micro.members)
        done = [s for s in rows if self.sequences[s].finished or self.sequences[s].reaches_length(ahead=1)]
        for seq in done:
            self._leave(micro, seq)
        if not micro.members:
            return  # waiting micro-batches take its place as decoding ones of their own
        kept = [i for i, s in enumerate(rows) if s not in done]
        joining = self._absorb(micro) if self._is_smallest(micro) else []
        if any(self.sequences[s].constraint is not None for s in micro.members):
            return  # a grammar's mask needs the pending tokens' values: built at launch
        if self._prompt_ending():
            # Built at launch instead, so a prompt whose prefill ends meanwhile joins that
            # step, not the one after: its first token comes one decode step sooner.
            return
        parts = []
        if kept:
            parts.append(pending if len(kept) == len(rows) else pending[mx.array(kept)])
        if joining:
            parts.append(self._next_inputs(joining))
        micro.work = self._decode_step(micro, mx.concatenate(parts) if len(parts) > 1 else parts[0])

    # Micro-batch membership.

    def _decoding(self) -> list[MicroBatch]:
        return [b for b in self.micro_batches.values() if b.decoding and b.batch not in self.waiting]

    def _is_smallest(self, micro: MicroBatch) -> bool:
        return bool(self.waiting) and len(micro.members) <= min(len(b.members) for b in self._decoding())

    def _absorb(self, micro: MicroBatch) -> list[int]:
        """Merge every waiting micro-batch into `micro`; returns the sequences that joined."""
        joined = []
        for batch in self.waiting:
            waiting = self.micro_batches[batch]
            for seq in [s for s in waiting.members if self.sequences[s].finished]:
                self._leave(waiting, seq)
            if waiting.members:
                joined += waiting.members
                self._merge(micro, waiting)
        self.waiting.clear()
        return joined

    def _merge(self, micro: MicroBatch, other: MicroBatch) -> None:
        """The sequences of `other` join `micro` as new rows, on every rank."""
        self.pipeline.tell(Header(Op.MERGE, micro.batch, other.batch))
        for seq in other.members:
            self.sequences[seq].batch = micro.batch
        micro.members += other.members
        del self.micro_batches[other.batch]

    def _promote_waiting(self) -> None:
        """Waiting micro-batches start decoding on their own while there is room."""
        while self.waiting and (self.max_decoding is None or len(self._decoding()) < self.max_decoding):
            self.ready.append(self.waiting.pop(0))

    def _leave(self, micro: MicroBatch, seq: int) -> None:
        """`seq` leaves its batch on every rank; what it computed is kept in
        the prompt cache when that is on."""
        sequence = self.sequences[seq]
        entry, evicted = None, []
        # A row of a padded prefill still under way holds padding, not just its tokens.
        padded = not micro.decoding and len(micro.members) > 1
        if self.prompt_cache is not None and sequence.fed > 0 and not padded:
            entry, evicted = self.prompt_cache.insert(sequence.tokens[: sequence.fed])
        flag = int(entry is not None)
        self.pipeline.tell(Header(Op.LEAVE, micro.batch, seq, entry or 0, flag))
        for old in evicted:
            self.pipeline.tell(Header(Op.EVICT, seq=old))
        micro.members.remove(seq)
        if not micro.members:
            del self.micro_batches[micro.batch]
        self.reserved -= sequence.reserved
        sequence.left = True
        if sequence.finished:
            del self.sequences[seq]

    # Collecting results.

    def _collect(self) -> list[TokenResult]:
        flight = self.flights.popleft()
        if self.pipeline.results_over_ring:
            if flight.drafts and flight.members[0] in self.sequences:
                self.transport.flush()  # the verification goes on around the ring meanwhile
                self.speculation.ahead(self.sequences[flight.members[0]], flight.drafts)
            self.transport.receive(flight.results)
            self.transport.flush()  # the next rank may be waiting for a step started since
        values = flight.results[-1].tolist()
        results = []
        if flight.drafts:
            results = self._verified(flight, values)
        elif flight.sample:
            for seq, token in zip(flight.members, values):
                sequence = self.sequences.get(seq)
                if sequence is None or sequence.finished:
                    continue  # a row that rode along after its sequence ended
                results.append(sequence.draw(token, self.eos_token_ids))
                if results[-1].finish_reason is not None:
                    self.finish(seq)
        micro = self.micro_batches.get(flight.batch)
        if micro is not None and micro.batch not in self.ready and not self._in_flight(micro):
            self._requeue(micro)  # a prompt's last chunk is back: it decodes from now on
        return results

    def _in_flight(self, micro: MicroBatch) -> bool:
        return any(flight.batch == micro.batch for flight in self.flights)

    def _verified(self, flight: Flight, sampled: list[int]) -> list[TokenResult]:
        """A verification step's tokens; then every rank forgets the positions after the last one kept."""
        sequence = self.sequences.get(flight.members[0])
        if sequence is None:
            return []  # it left: its caches are gone
        results = [] if sequence.finished else self.speculation.take(sequence, flight.drafts, sampled,
                                                                     self.eos_token_ids)
        if results and results[-1].finish_reason is not None:
            self.finish(sequence.seq)
        if unused := len(sampled) - len(results):
            self.pipeline.tell(Header(Op.TRIM, flight.batch, length=unused))
            sequence.fed -= unused
        return results

    def _requeue(self, micro: MicroBatch) -> None:
        if not micro.decoding and self._prefilled(micro):
            micro.decoding = True
            self._log_prefilled(micro)
            others = len(self._decoding()) - 1
            if self.max_decoding is not None and others >= self.max_decoding and not self._steps_alone(micro):
                self.waiting.append(micro.batch)
                return
        self.ready.append(micro.batch)
