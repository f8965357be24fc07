"""Whether a running batch leaves interactive requests their time to first token: the
TTFT of streamed chat completions on an idle ring, then while a batch (OpenAI's Batch
API) keeps BATCH_MAX_ACTIVE of its lines generating. Target: busy p50 <= 1.5x idle p50.

Starts the ranks under MPI and the API on a fresh spool. TTFT is the client's (request
sent -> first content chunk) and, to tell the API's share from the ring's, rank 0's own
(request claimed -> first token, from the spool).

    .venv/bin/python -m bench.batch_priority [--requests 10] [--ranks 2] [--batch-max-active 4] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

from bench.api_latency import engine_timings, stream_chat
from bench.ring import serving

QUESTIONS = ["Tell me about the harbour.", "Name a colour.", "What is the weather like?", "Count to three."]


def start_batch(client: httpx.Client, model: str, lines: int, max_tokens: int) -> str:
    """Upload `lines` chat lines and create a batch of them; its id."""
    rows = [{"custom_id": f"bench-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                      "max_tokens": max_tokens, "temperature": 0}} for i in range(lines)]
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    uploaded = client.post("/v1/files", files={"file": ("bench.jsonl", data)}, data={"purpose": "batch"})
    uploaded.raise_for_status()
    batch = client.post("/v1/batches", json={"input_file_id": uploaded.json()["id"],
                                             "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    batch.raise_for_status()
    return batch.json()["id"]


def ttfts(client: httpx.Client, model: str, spool_dir, requests: int, first: int) -> tuple[list[float], list[float]]:
    """Client and engine TTFTs of `requests` one-token chat completions, one after another,
    numbered from `first` (so no two prompts are alike: the prompt cache holds only
    the part they share, as for any two conversations)."""
    client_s, engine_s = [], []
    for i in range(first, first + requests):
        run = stream_chat(client, model, f"Say one word. ({i})", 1)
        client_s.append(run["arrivals"][0] - run["sent"])
        engine_s.append(engine_timings(spool_dir, run["id"])["time_to_first_token"])
    return client_s, engine_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-max-active", type=int, default=4)
    parser.add_argument("--batch-lines", type=int, default=400)
    parser.add_argument("--batch-tokens", type=int, default=64)
    parser.add_argument("--model", help="mlx-lm model directory (default: the embedded default model)")
    args = parser.parse_args()

    from models import served_name

    served = served_name(args.model)
    with serving(args.model, args.ranks, BATCH_MAX_ACTIVE=str(args.batch_max_active)) as (url, spool_dir):
        client = httpx.Client(base_url=url, timeout=600)
        ttfts(client, served, spool_dir, 2, 0)  # warm-up
        idle, idle_engine = ttfts(client, served, spool_dir, args.requests, 1000)
        batch_id = start_batch(client, served, args.batch_lines, args.batch_tokens)
        while client.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] < 1:
            time.sleep(0.1)
        busy, busy_engine = ttfts(client, served, spool_dir, args.requests, 2000)
        batch = client.get(f"/v1/batches/{batch_id}").json()
        client.post(f"/v1/batches/{batch_id}/cancel").raise_for_status()
        counts = batch["request_counts"]
        if batch["status"] != "in_progress":
            raise SystemExit(f"the batch ended ({batch['status']}) before the busy requests did: use more lines")

    ratio = statistics.median(busy) / statistics.median(idle)
    print(f"\nTTFT p50 over {args.requests} requests, BATCH_MAX_ACTIVE={args.batch_max_active}, {args.ranks} rank(s):")
    print(f"  idle ring:       client {1000 * statistics.median(idle):.1f} ms, "
          f"engine {1000 * statistics.median(idle_engine):.1f} ms")
    print(f"  batch running:   client {1000 * statistics.median(busy):.1f} ms, "
          f"engine {1000 * statistics.median(busy_engine):.1f} ms "
          f"({counts['completed']}/{counts['total']} batch lines done meanwhile)")
    print(f"  ratio {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
