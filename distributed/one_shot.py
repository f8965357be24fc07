"""One-shot mode on rank 0: generate once for a prompt, print it, release the other ranks.
For checking a cluster: greedy output is comparable with mlx-lm's."""

from __future__ import annotations

import argparse
import json
import logging
import time

from distributed.cluster import Cluster
from distributed.limits import RequestError
from spool.protocol import SamplingParams

log = logging.getLogger(__name__)


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
    # mlx-lm's streaming detokenizer, as for served requests: `decode` may differ (spaces).
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    text = detokenizer.text
    if args.json:
        timings = {
            "prompt_tokens": len(prompt),
            "time_to_first_token": first_token_at - started,
            # Tokens after the first, over the time they took: decode speed alone.
            "decode_tokens_per_second": max(len(tokens) - 1, 0) / max(finished - first_token_at, 1e-9),
        }
        result = {"text": text, "token_ids": tokens, "finish_reason": finish_reason, "timings": timings,
                  "speculation": cluster.scheduler.speculation_record()}
        print(json.dumps(result | {"parallel": cluster.parallel.record(), "ranks": cluster.ranks}))
    else:
        print(text)
    return 0
