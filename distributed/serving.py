"""Rank 0 in serve mode: requests from the spool, through the scheduler and the ring,
tokens and final records back into the spool."""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

from distributed.cluster import Cluster
from distributed.control import carry_out_controls
from distributed.limits import RequestError
from distributed.sequence import TokenResult
from distributed.serving_stats import ServingStats, ring_settings
from distributed.text_stream import TextStream
from models import served_name
from spool import Spool
from spool.protocol import Delta, Failed, Final, SpoolRequest, Started, Timings, TokenLogprob, Usage

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 1.0  # seconds between heartbeats while serving
PURGE_EVERY = 60.0  # seconds between sweeps of finished requests


@dataclass
class Claim:
    """A request rank 0 took from the spool. Its time to first token counts from
    here, as one-shot mode's counts from handing the prompt to the scheduler."""

    request_id: str
    request: SpoolRequest
    drawn: list[int] = field(default_factory=list)  # tokens it streamed before a restart
    claimed_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Reply:
    """One request being answered: where its tokens go and what to report."""

    request_id: str
    prompt_tokens: int
    stream: TextStream
    cached_tokens: int
    started: float
    claimed_at: float
    first_token: Optional[float] = None
    completion: int = 0
    accepted: int = 0  # completion tokens that were accepted speculative proposals
    unwritten: list[int] = field(default_factory=list)  # drawn tokens whose text is held back
    logprobs: Optional[list[TokenLogprob]] = None  # theirs, when the request asked for them
    batch: bool = False  # a batch line, which yields to interactive requests


class Serving:
    """Rank 0 in serve mode: spool in, ring, spool out."""

    def __init__(self, cluster: Cluster, settings, spool: Spool):
        self.cluster = cluster
        self.stats = ServingStats()
        self.scheduler = cluster.scheduler
        self.settings = settings
        self.spool = spool
        self.model = served_name(settings.model_repo)
        self.stopping = False
        self.replies: dict[int, Reply] = {}
        self.held: Optional[Claim] = None  # claimed, waiting for KV room
        self.peak_active = 0
        self.next_heartbeat = 0.0
        self.next_purge = 0.0

    def heartbeat(self, state: str = "ready") -> None:
        now = time.monotonic()
        if state == "ready" and now < self.next_heartbeat:
            return
        self.next_heartbeat = now + HEARTBEAT_EVERY
        prompt_cache = self.scheduler.prompt_cache
        self.spool.write_heartbeat(
            {
                "state": state,
                "model": self.model,
                "active": len(self.replies),
                "peak_active": self.peak_active,
                "micro_batches": self.scheduler.max_in_flight,
                "kv_capacity_bytes": self.scheduler.limits.kv_capacity,
                "kv_reserved_bytes": self.scheduler.reserved,
                "prompt_cache_tokens": prompt_cache.tokens if prompt_cache else None,
                "speculation": self.scheduler.speculation_record(),
                "parallel": self.cluster.parallel.record(),
                "ranks": self.cluster.ranks,
                "settings": ring_settings(self.settings),
                **self.stats.record(),
            }
        )
        if now >= self.next_purge:
            self.next_purge = now + PURGE_EVERY
            self.spool.purge(self.settings.spool_retention)

    def run(self) -> int:
        requeued, quarantined = self.spool.requeue_claimed()
        if requeued:
            log.info("requeued %d requests left unfinished by the last run; they resume where they were",
                     len(requeued))
        for request_id in quarantined:
            log.warning("request %s quarantined: in flight during two ring failures in a row", request_id)
        events: list[TokenResult] = []
        while not self.stopping:
            self.heartbeat()
            carry_out_controls(self.spool, self.scheduler)
            self.admit()
            if self.scheduler.busy or events:
                # Tokens are written before the next steps start: starting a step
                # computes rank 0's share of it (MLX's async_eval returns only once most
                # of a large graph has run), which would hold every token back by as long.
                self.write_out(events)
                self.scheduler.launch()
                events = self.scheduler.collect()
            else:
                # The other ranks sleep on their doorbells meanwhile.
                self.cluster.pipeline.transport.check_ring()
                self.spool.wait_for_work(self.settings.poll_interval)
        self.write_out(events)
        log.info("stopping; %d requests stay claimed for the next start", len(self.replies))
        self.heartbeat("stopped")
        self.scheduler.shutdown()
        return 0

    def admit(self) -> None:
        """Start claimed requests while their KV reservations fit; the first one
        that doesn't waits, and the rest stay in the spool. Interactive requests come
        first; batch lines only while fewer than BATCH_MAX_ACTIVE of them run."""
        while not self.stopping:
            if self.held is None:
                batch_active = sum(reply.batch for reply in self.replies.values())
                claimed = self.spool.claim(take_batch=batch_active < self.settings.batch_max_active)
                if claimed is None:
                    return
                # A request the last run left unfinished resumes after the tokens it streamed.
                self.held = Claim(*claimed, drawn=self.spool.streamed_tokens(claimed[0]))
            request_id, request, drawn = self.held.request_id, self.held.request, self.held.drawn
            prompt = request.prompt_tokens + drawn
            if len(drawn) >= request.max_tokens:
                self.finish_drawn(self.held, drawn)  # it was down to its final record
                self.held = None
                continue
            try:
                if not self.scheduler.fits(len(prompt), request.max_tokens - len(drawn)):
                    return
                seq = self.scheduler.submit(prompt, request.sampling, request.max_tokens - len(drawn), len(drawn),
                                            request.grammar, request.logprobs, background=request.batch is not None)
            except RequestError as err:
                log.info("request %s refused: %s", request_id, err)
                self.spool.finish(request_id, Failed(message=str(err), code=err.code, status=400))
                self.held = None
                continue
            claim, self.held = self.held, None
            # The API starts its response now, so the first token travels alone.
            self.spool.append(request_id, Started())
            cached = self.scheduler.sequences[seq].cached
            stream = TextStream(self.cluster.tokenizer, request.stop, partial(self.scheduler.finish, seq))
            for token in drawn:
                stream.add(token)  # the text they made was written before the restart
            self.replies[seq] = Reply(request_id, len(request.prompt_tokens), stream, cached, claim.started,
                                      claim.claimed_at, completion=len(drawn),
                                      logprobs=[] if request.logprobs is not None else None,
                                      batch=request.batch is not None)
            self.peak_active = max(self.peak_active, self.scheduler.active)
            log.info("request %s: %d prompt tokens (%d cached)%s, %d active", request_id, len(request.prompt_tokens),
                     cached, f", resumed after {len(drawn)} tokens" if drawn else "", len(self.replies))

    def write_out(self, events: list[TokenResult]) -> None:
        """Tokens into their requests' streams; then cancelled requests end."""
        for result in events:
            if result.seq not in self.replies:
                continue  # its request failed earlier in this list
            try:
                self.on_token(result)
            except Exception:
                # One request's text (a tokenizer's failure) must not end everyone's.
                log.exception("request %s failed on token %d", self.replies[result.seq].request_id, result.token)
                self.fail(result.seq, "internal error while making the text of this request")
        self.check_cancelled()

    def on_token(self, result: TokenResult) -> None:
        """Write a token's text, and the end the scheduler or a stop string gives."""
        reply = self.replies[result.seq]
        reply.first_token = reply.first_token or time.perf_counter()
        if result.in_completion:
            self.stats.token()
            reply.completion += 1
            reply.accepted += result.from_draft
            reply.unwritten.append(result.token)
            if reply.logprobs is not None:
                reply.logprobs.append(result.logprob)
            text, hit = reply.stream.add(result.token)
            if text or hit:
                self.write_delta(reply, text)
            if hit:
                self.end(result.seq, "stop")
                return
        if result.finish_reason is not None:
            self.end(result.seq, result.finish_reason)

    def write_delta(self, reply: Reply, text: str) -> None:
        """The text made so far, with the tokens (and log-probabilities) it came from."""
        self.spool.append(reply.request_id, Delta(text=text, token_ids=reply.unwritten, logprobs=reply.logprobs))
        reply.unwritten = []
        reply.logprobs = [] if reply.logprobs is not None else None

    def check_cancelled(self) -> None:
        for seq, reply in list(self.replies.items()):
            if self.spool.is_cancelled(reply.request_id):
                self.scheduler.finish(seq)
                self.end(seq, "cancelled")

    def end(self, seq: int, finish_reason: str) -> None:
        """Write a request's final record (its sequence is finished on the ring already)."""
        reply = self.replies.pop(seq)
        stop_sequence = reply.stream.stop.reached
        if stop_sequence is None:
            # Held-back text (a partial character, a possible stop string's start) is reply.
            tail = reply.stream.finish()
            if tail or reply.unwritten:
                self.write_delta(reply, tail)
        now = time.perf_counter()
        usage = Usage.of(reply.prompt_tokens, reply.completion, reply.cached_tokens, reply.accepted)
        timings = Timings(claimed_at=reply.claimed_at, time_to_first_token=(reply.first_token or now) - reply.started,
                          total=now - reply.started)
        self.stats.answered(timings.time_to_first_token, reply.cached_tokens)
        final = Final(finish_reason=finish_reason, stop_sequence=stop_sequence, usage=usage, timings=timings)
        self.spool.finish(reply.request_id, final)
        log.info(
            "request %s: %s after %d tokens in %.2fs",
            reply.request_id, finish_reason, reply.completion, now - reply.started,
        )


    def finish_drawn(self, claim: Claim, drawn: list[int]) -> None:
        """A request that had drawn all its tokens before the restart: its held-back text
        and its final record."""
        stream = TextStream(self.cluster.tokenizer, claim.request.stop, lambda: None)
        for token in drawn:
            stream.add(token)
        if tail := stream.finish():
            self.spool.append(claim.request_id, Delta(text=tail))
        usage = Usage.of(len(claim.request.prompt_tokens), len(drawn))
        self.spool.finish(claim.request_id, Final(finish_reason="length", usage=usage))

    def fail(self, seq: int, message: str) -> None:
        """End one request with an error; its sequence leaves the ring, the others go on."""
        self.scheduler.finish(seq)
        reply = self.replies.pop(seq)
        self.spool.finish(reply.request_id, Failed(message=message, code="internal_error"))


def serve(cluster: Cluster, settings, spool: Spool) -> int:
    serving = Serving(cluster, settings, spool)

    def stop(signum, frame):
        serving.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return serving.run()
