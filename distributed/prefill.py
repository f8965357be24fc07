"""How the scheduler prefills prompts: which goes first (interactive before batch lines,
then first come, first served), which start together as one padded micro-batch, and the
chunks they go through in, as mlx-lm's generate_step cuts them.

Pipelined prefill: a chunk's step needs nothing back from the one before (every rank
takes rank 0's steps in order, so each extends its caches in turn), so on a ring of
several stages a prompt's next chunk is launched right after the one before, up to
MICRO_BATCHES steps in flight: chunk k+1 enters rank 0 while chunk k is on rank 1, and a
prompt on N stages takes about 1/N of one stage's time, plus one chunk's trip along the
ring. Its last chunk's acknowledgement brings it to decoding. There, chunks are of
PIPELINE_PREFILL_STEP_SIZE tokens, so that a long prompt makes several per stage.
A mixin of `distributed.scheduler.Scheduler`, whose state it reads."""

from __future__ import annotations

import json
import logging

import mlx.core as mx

from distributed.messages import Header, Op
from distributed.micro_batch import MicroBatch
from distributed.transport import StepWork

log = logging.getLogger(__name__)


def prefill_chunk(step_size: int, pipelined_step_size: int, pipelined: bool) -> int:
    """Prompt tokens per prefill step: PREFILL_STEP_SIZE, or where chunks pipeline
    PIPELINE_PREFILL_STEP_SIZE (0: the same), never more than PREFILL_STEP_SIZE."""
    return min(step_size, pipelined_step_size or step_size) if pipelined else step_size


class Prefill:
    def _prefill_order(self, micro: MicroBatch) -> tuple[bool, int]:
        """Interactive prompts first, then batch lines; first come, first served."""
        return self._batch_lines_only(micro), micro.batch

    def _batch_lines_only(self, micro: MicroBatch) -> bool:
        return all(self.sequences[s].background for s in micro.members)

    def _yields(self, micro: MicroBatch) -> bool:
        """Whether a micro-batch of batch lines waits: it does until the interactive
        prompts being prefilled, or about to take their first decode step on their own,
        have launched that step, so their first token comes about as soon as on an
        idle ring (a batch step of several rows can cost as much as a prompt chunk)."""
        return self._batch_lines_only(micro) and any(
            b.batch not in self.waiting and not self._batch_lines_only(b)
            and any(self.sequences[s].fed < self.sequences[s].prompt_tokens for s in b.members)
            for b in self.micro_batches.values())

    def _steps_alone(self, micro: MicroBatch) -> bool:
        """An interactive micro-batch just prefilled, while only batch lines decode, takes
        its first steps on its own rather than waiting to join theirs: batch lines never
        delay an interactive request's first token by their rows."""
        return not self._batch_lines_only(micro) and all(
            self._batch_lines_only(b) for b in self._decoding() if b is not micro)

    def _remaining_prompt(self, seq: int) -> int:
        """Prompt tokens still to prefill (the last one goes through the first decode step)."""
        sequence = self.sequences[seq]
        return sequence.prompt_tokens - 1 - sequence.fed

    def _unstarted(self, micro: MicroBatch) -> bool:
        """A lone sequence none of whose prompt has been prefilled yet."""
        if len(micro.members) != 1 or micro.decoding:
            return False
        sequence = self.sequences[micro.members[0]]
        return sequence.fed == sequence.cached and not sequence.finished

    def _gather_prompts(self, micro: MicroBatch) -> None:
        """Merge into `micro` the other prompts waiting to start, first come first
        served, while one chunk of them all (padding included) fits in
        PREFILL_STEP_SIZE tokens; then tell every rank how they are padded."""
        if self.max_decoding is None:
            return  # no batch caches
        longest = self._remaining_prompt(micro.members[0])
        share = self._fair_share()
        for batch in sorted(self.ready):
            other = self.micro_batches[batch]
            if not self._unstarted(other):
                continue
            remaining = self._remaining_prompt(other.members[0])
            if (len(micro.members) + 1) * min(self.prefill_chunk, max(longest, remaining)) > self.prefill_step_size:
                break
            if len(micro.members) + 1 > share:
                break
            longest = max(longest, remaining)
            self.ready.remove(batch)
            self._merge(micro, other)
        if len(micro.members) == 1:
            return
        lengths = [self._remaining_prompt(s) for s in micro.members]
        padding = {"lengths": lengths, "right_padding": [max(lengths) - n for n in lengths]}
        self.pipeline.tell(Header(Op.PREPARE, micro.batch), json.dumps(padding).encode())
        log.info("prefilling %d prompts together (%s tokens)", len(lengths), ", ".join(map(str, lengths)))

    def _fair_share(self) -> int:
        """The most sequences a micro-batch of prompts may gather: their even share of
        the micro-batches in flight. Prompts that arrive together then decode as
        several micro-batches, which keep the stages of a ring busy at once, instead of
        one that leaves every stage but one idle."""
        sequences = sum(len(b.members) for b in self.micro_batches.values())
        return -(-sequences // self.max_in_flight)

    def _prefill_step(self, micro: MicroBatch) -> tuple[StepWork, int]:
        """The next chunk of the prompts but their last tokens, chunked as mlx-lm's
        generate_step does so that outputs match it exactly; shorter prompts of a
        micro-batch are right-padded. The last prompt token goes through the sequence's
        first decode step, which samples."""
        sequences = [self.sequences[s] for s in micro.members]
        todo = [s.tokens[s.fed : s.prompt_tokens - 1] for s in sequences]
        count = min(self.prefill_chunk, max(len(t) for t in todo))
        rows = []
        for sequence, tokens in zip(sequences, todo):
            chunk = tokens[:count]
            sequence.fed += len(chunk)
            rows.append(chunk + [0] * (count - len(chunk)))
        self.prefill_budget -= count * len(rows)
        micro.chunks += 1
        micro.most_in_flight = max(micro.most_in_flight, 1 + sum(f.batch == micro.batch for f in self.flights))
        return self.pipeline.run(micro.batch, mx.array(rows, dtype=mx.int32), False), count

    def _prompt_ending(self) -> bool:
        """Whether a prompt being prefilled ends with its next chunk."""
        return any(not b.decoding and all(self._remaining_prompt(s) <= self.prefill_chunk for s in b.members)
                   for b in self.micro_batches.values())

    def _prefilled(self, micro: MicroBatch) -> bool:
        return all(self._remaining_prompt(s) <= 0 for s in micro.members)

    def _log_prefilled(self, micro: MicroBatch) -> None:
        if micro.chunks:
            log.info("batch %d prefilled: %d prompt(s), %d chunk(s) of up to %d tokens, at most %d in flight",
                     micro.batch, len(micro.members), micro.chunks, self.prefill_chunk, micro.most_in_flight)
