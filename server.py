"""Rank entry point: one process per machine, started by mlx.launch or mpirun.

`python server.py --prompt TEXT` generates once and exits (checks a cluster);
without --prompt, rank 0 serves the spool and the other ranks follow it.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

from config import settings_or_exit
from distributed.cluster import Cluster, start_cluster
from distributed.doorbell import RingBroken
from distributed.follower import follow
from distributed.limits import RequestError
from distributed.sequence import TokenResult
from distributed.world import join_world
from spool.protocol import Delta, Failed, Final, SamplingParams, SpoolRequest, Started, Timings, Usage
from models import served_name
from spool import Spool
from text_stream import TextStream

log = logging.getLogger("server")

HEARTBEAT_EVERY = 1.0  # seconds between heartbeats while serving
PURGE_EVERY = 60.0  # seconds between sweeps of finished requests


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt", help="generate once for this prompt, print it on rank 0, exit")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--max-tokens", type=int, help="default: DEFAULT_MAX_TOKENS")
    # Greedy unless asked: one-shot mode checks a cluster against mlx-lm's greedy output.
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--json", action="store_true", help="print text and token ids as JSON")
    parser.add_argument("--log-file", help="also log to this file; {rank} becomes the rank number")
    return parser.parse_args(argv)


def setup_logging(level: str, rank: int, log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        path = Path(log_file.format(rank=rank))
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path))
    logging.basicConfig(
        level=level,
        handlers=handlers,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
    )


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return tokenizer.encode(prompt)


def run_once(cluster: Cluster, args: argparse.Namespace, max_tokens: int) -> int:
    """Rank 0 of one-shot mode: generate, print, release the other ranks."""
    tokenizer = cluster.tokenizer
    params = SamplingParams.pick(vars(args))
    tokens: list[int] = []
    prompt = encode_prompt(tokenizer, args.prompt, args.chat)
    try:
        started = time.perf_counter()
        first_token_at = None
        for drawn in cluster.scheduler.generate(prompt, params, max_tokens):
            first_token_at = first_token_at or time.perf_counter()
            if drawn.in_completion:
                tokens.append(drawn.token)
            finish_reason = drawn.finish_reason
        finished = time.perf_counter()
    except RequestError as err:
        log.error("request refused: %s", err)
        return 2
    finally:
        cluster.scheduler.shutdown()
    text = tokenizer.decode(tokens)
    if args.json:
        timings = {
            "prompt_tokens": len(prompt),
            "time_to_first_token": first_token_at - started,
            # Tokens after the first, over the time they took: decode speed alone.
            "decode_tokens_per_second": max(len(tokens) - 1, 0) / max(finished - first_token_at, 1e-9),
        }
        result = {"text": text, "token_ids": tokens, "finish_reason": finish_reason, "timings": timings}
        print(json.dumps(result | {"ranks": cluster.ranks}))
    else:
        print(text)
    return 0


@dataclass
class Claim:
    """A request rank 0 took from the spool. Its time to first token counts from
    here, as one-shot mode's counts from handing the prompt to the scheduler."""

    request_id: str
    request: SpoolRequest
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


class Serving:
    """Rank 0 in serve mode: spool in, ring, spool out."""

    def __init__(self, cluster: Cluster, settings, spool: Spool):
        self.cluster = cluster
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
                "kv_capacity_tokens": self.scheduler.limits.kv_capacity,
                "kv_reserved_tokens": self.scheduler.reserved,
                "prompt_cache_tokens": prompt_cache.tokens if prompt_cache else None,
                "ranks": self.cluster.ranks,
            }
        )
        if now >= self.next_purge:
            self.next_purge = now + PURGE_EVERY
            self.spool.purge(self.settings.spool_retention)

    def run(self) -> int:
        requeued = self.spool.requeue_claimed()
        if requeued:
            log.info("requeued %d requests left unfinished by the last run", len(requeued))
        events: list[TokenResult] = []
        while not self.stopping:
            self.heartbeat()
            self.admit()
            if self.scheduler.busy or events:
                # The next steps start first, so the ring computes while the last
                # step's tokens are written out.
                self.scheduler.launch()
                self.write_out(events)
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
        that doesn't waits, and the rest stay in the spool."""
        while not self.stopping:
            if self.held is None:
                claimed = self.spool.claim()
                if claimed is None:
                    return
                self.held = Claim(*claimed)
            request_id, request = self.held.request_id, self.held.request
            prompt = request.prompt_tokens
            try:
                if not self.scheduler.fits(len(prompt), request.max_tokens):
                    return
                seq = self.scheduler.submit(prompt, request.sampling, request.max_tokens)
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
            self.replies[seq] = Reply(request_id, len(prompt), stream, cached, claim.started, claim.claimed_at)
            self.peak_active = max(self.peak_active, self.scheduler.active)
            log.info(
                "request %s: %d prompt tokens (%d cached), %d active",
                request_id, len(prompt), cached, len(self.replies),
            )

    def write_out(self, events: list[TokenResult]) -> None:
        """Tokens into their requests' streams; then cancelled requests end."""
        for result in events:
            self.on_token(result)
        self.check_cancelled()

    def on_token(self, result: TokenResult) -> None:
        """Write a token's text, and the end the scheduler or a stop string gives."""
        reply = self.replies[result.seq]
        reply.first_token = reply.first_token or time.perf_counter()
        if result.in_completion:
            reply.completion += 1
            text, hit = reply.stream.add(result.token)
            if text or hit:
                self.spool.append(reply.request_id, Delta(text=text, token_ids=[result.token]))
            if hit:
                self.end(result.seq, "stop")
                return
        if result.finish_reason is not None:
            self.end(result.seq, result.finish_reason)

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
            if tail:
                self.spool.append(reply.request_id, Delta(text=tail))
        now = time.perf_counter()
        usage = Usage.of(reply.prompt_tokens, reply.completion, reply.cached_tokens)
        timings = Timings(claimed_at=reply.claimed_at, time_to_first_token=(reply.first_token or now) - reply.started,
                          total=now - reply.started)
        final = Final(finish_reason=finish_reason, stop_sequence=stop_sequence, usage=usage, timings=timings)
        self.spool.finish(reply.request_id, final)
        log.info(
            "request %s: %s after %d tokens in %.2fs",
            reply.request_id, finish_reason, reply.completion, now - reply.started,
        )


def serve(cluster: Cluster, settings, spool: Spool) -> int:
    serving = Serving(cluster, settings, spool)

    def stop(signum, frame):
        serving.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return serving.run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `kill -USR1 <pid>` prints where each thread of a rank is, for a ring that looks stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    settings = settings_or_exit()
    world = join_world(settings.backend)
    setup_logging(settings.log_level, world.rank(), args.log_file)
    spool = None
    if args.prompt is None and world.rank() == 0:
        spool = Spool(settings.spool_dir)
        spool.write_heartbeat({"state": "loading", "model": served_name(settings.model_repo)})
    try:
        cluster = start_cluster(settings, world)
    except ValueError as err:
        log.error("%s", err)
        if spool is not None:
            spool.write_heartbeat({"state": "failed", "reason": str(err)})
        return 2
    try:
        if not cluster.stage.is_first:
            follow(cluster.pipeline)
            log.info("released by rank 0; exiting")
            return 0
        if args.prompt is not None:
            return run_once(cluster, args, args.max_tokens or settings.default_max_tokens)
        return serve(cluster, settings, spool)
    except RingBroken as err:
        # Claimed requests stay claimed: the next start puts them back in the queue.
        log.error("ring broken: %s", err)
        if spool is not None:
            spool.write_heartbeat({"state": "failed", "reason": f"ring broken: {err}"})
        return 1


if __name__ == "__main__":
    sys.exit(main())
