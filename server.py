"""Rank entry point: one process per machine, started by mlx.launch or mpirun.

`python server.py --prompt TEXT` generates once and exits (checks a cluster);
without --prompt, rank 0 serves the spool and the other ranks follow it.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

from config import settings_or_exit
from distributed.cluster import Cluster, start_cluster
from distributed.group import init_group
from distributed.pipeline import RequestError
from distributed.sampling import SamplingParams
from models import served_name
from spool import Spool
from text_stream import TextStream

log = logging.getLogger("server")

HEARTBEAT_EVERY = 1.0  # seconds between heartbeats while serving
PURGE_EVERY = 60.0  # seconds between sweeps of finished requests
STAY_AWAKE = 2.0  # seconds after a request during which the ring stays ready to start at once


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt", help="generate once for this prompt, print it on rank 0, exit")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--max-tokens", type=int, help="default: DEFAULT_MAX_TOKENS")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
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
    finish_reason = "length"
    prompt = encode_prompt(tokenizer, args.prompt, args.chat)
    try:
        started = time.perf_counter()
        steps = cluster.pipeline.generate(prompt, params, max_tokens)
        for token in steps:
            if not tokens:
                first_token_at = time.perf_counter()
            if token in tokenizer.eos_token_ids:
                finish_reason = "stop"
                break
            tokens.append(token)
        steps.close()
        finished = time.perf_counter()
    except RequestError as err:
        log.error("request refused: %s", err)
        return 2
    finally:
        cluster.pipeline.shutdown()
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


class Serving:
    """Rank 0 in serve mode: spool in, ring, spool out."""

    def __init__(self, cluster: Cluster, settings, spool: Spool):
        self.cluster = cluster
        self.settings = settings
        self.spool = spool
        self.model = served_name(settings.model_repo)
        self.stopping = False
        self.active = 0
        self.next_heartbeat = 0.0
        self.next_purge = 0.0

    def heartbeat(self, state: str = "ready") -> None:
        now = time.monotonic()
        if state == "ready" and now < self.next_heartbeat:
            return
        self.next_heartbeat = now + HEARTBEAT_EVERY
        self.spool.write_heartbeat(
            {"state": state, "model": self.model, "active": self.active, "ranks": self.cluster.ranks}
        )
        if now >= self.next_purge:
            self.next_purge = now + PURGE_EVERY
            self.spool.purge(self.settings.spool_retention)

    def run(self) -> int:
        requeued = self.spool.requeue_claimed()
        if requeued:
            log.info("requeued %d requests left unfinished by the last run", len(requeued))
        poll = self.settings.poll_interval
        last_work = time.monotonic()
        while not self.stopping:
            self.heartbeat()
            job = self.spool.claim()
            if job is not None:
                self.handle(*job)
                last_work = time.monotonic()
            elif time.monotonic() - last_work < STAY_AWAKE:
                # Recently busy: the others wait in a receive, so the next request starts at once.
                self.spool.wait_for_work(poll)
            else:
                # Idle: the others sleep instead of busy-polling a receive.
                self.cluster.pipeline.idle(poll)
                self.spool.wait_for_work(poll)
        log.info("stopping")
        self.heartbeat("stopped")
        self.cluster.pipeline.shutdown()
        return 0

    def handle(self, request_id: str, request: dict) -> None:
        """Generate one request into its stream; cancellation and stops end it early."""
        log.info("request %s: %d prompt tokens", request_id, len(request["prompt_tokens"]))
        tokenizer = self.cluster.tokenizer
        stream = TextStream(tokenizer, request.get("stop") or [])
        params = SamplingParams.pick(request)
        prompt = request["prompt_tokens"]
        completion, finish_reason, stop_text_hit = 0, "length", False
        started, claimed_at = time.perf_counter(), time.time()
        first_token = None
        self.active = 1
        steps = self.cluster.pipeline.generate(prompt, params, request["max_tokens"])
        try:
            for token in steps:
                first_token = first_token or time.perf_counter()
                if self.spool.is_cancelled(request_id) or self.stopping:
                    finish_reason = "cancelled"
                    break
                if token in tokenizer.eos_token_ids:
                    finish_reason = "stop"
                    break
                completion += 1
                text, hit = stream.add(token)
                if text or hit:
                    self.spool.append(request_id, {"type": "delta", "text": text, "token_ids": [token]})
                if hit:
                    finish_reason, stop_text_hit = "stop", True
                    break
                self.heartbeat()
        except RequestError as err:
            log.info("request %s refused: %s", request_id, err)
            self.spool.finish(request_id, {"type": "error", "message": str(err), "code": err.code, "status": 400})
            return
        finally:
            steps.close()
            self.active = 0
        if self.stopping:
            return  # left claimed: the next start serves it again
        if not stop_text_hit:
            # Held-back text (a partial character, a possible stop string's start) is reply.
            tail = stream.finish()
            if tail:
                self.spool.append(request_id, {"type": "delta", "text": tail, "token_ids": []})
        elapsed = time.perf_counter() - started
        self.spool.finish(
            request_id,
            {
                "type": "final",
                "finish_reason": finish_reason,
                "usage": {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": completion,
                    "total_tokens": len(prompt) + completion,
                },
                "timings": {
                    "claimed_at": claimed_at,
                    "time_to_first_token": (first_token or time.perf_counter()) - started,
                    "total": elapsed,
                },
            },
        )
        log.info("request %s: %s after %d tokens in %.2fs", request_id, finish_reason, completion, elapsed)


def serve(cluster: Cluster, settings, spool: Spool) -> int:
    serving = Serving(cluster, settings, spool)

    def stop(signum, frame):
        serving.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return serving.run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_or_exit()
    group = init_group(settings.backend)
    setup_logging(settings.log_level, group.rank(), args.log_file)
    spool = None
    if args.prompt is None and group.rank() == 0:
        spool = Spool(settings.spool_dir)
        spool.write_heartbeat({"state": "loading", "model": served_name(settings.model_repo)})
    try:
        cluster = start_cluster(settings, group)
    except ValueError as err:
        log.error("%s", err)
        if spool is not None:
            spool.write_heartbeat({"state": "failed", "reason": str(err)})
        return 2
    if not cluster.stage.is_first:
        cluster.pipeline.follow()
        return 0
    if args.prompt is not None:
        return run_once(cluster, args, args.max_tokens or settings.default_max_tokens)
    return serve(cluster, settings, spool)


if __name__ == "__main__":
    sys.exit(main())
