"""What HTTP + spool add: time to first token over the engine alone, and
end-to-end decode speed against single-process mlx-lm, in the same run.

Starts a 2-rank MPI ring in serve mode and the API, then streams chat
completions. Engine time to first token is what rank 0 recorded in the spool
(request claimed → first token); the client's is request sent → first content
chunk. Targets: added p50 <= 5 ms; decode ratio >= 0.97.

    .venv/bin/python -m bench.api_latency [--requests 12] [--rounds 4] [--ranks 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from bench.pipeline_decode import PROMPT, run_baseline
from bench.ring import serving
from bench.stats import p95


def stream_chat(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> dict:
    """Stream one greedy chat completion; chunk arrival times and usage."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    arrivals, usage, request_id = [], None, None
    with client.stream("POST", "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            request_id = chunk["id"].removeprefix("chatcmpl-")
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    return {"sent": sent, "arrivals": arrivals, "usage": usage, "id": request_id}


def engine_timings(spool_dir: Path, request_id: str) -> dict:
    lines = (spool_dir / "streams" / f"{request_id}.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["timings"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4,
                        help="decode runs of each side, alternating, as this machine's speed drifts")
    parser.add_argument("--model", help="mlx-lm model directory (default: the embedded default model)")
    args = parser.parse_args()

    from config import load_settings
    from models import resolve_model, served_name

    model_dir = args.model or resolve_model(None, load_settings().model_cache_dir)
    served = served_name(args.model)
    with serving(args.model, args.ranks) as (url, spool_dir):
        # One keep-alive client, as a real application would use.
        client = httpx.Client(base_url=url)
        to_claim, client_ttfts, engine_ttfts = [], [], []
        for i in range(args.requests):
            sent_at = time.time()
            run = stream_chat(client, served, f"Say one word. ({i})", 1)
            timings = engine_timings(spool_dir, run["id"])
            client_ttfts.append(run["arrivals"][0] - run["sent"])
            engine_ttfts.append(timings["time_to_first_token"])
            to_claim.append(timings["claimed_at"] - sent_at)
            if (i + 1) % 5 == 0:
                print(f"[{i + 1}/{args.requests}] TTFT requests", flush=True)

        decode = []
        baseline = []
        for i in range(args.rounds):
            run = stream_chat(client, served, PROMPT, args.tokens)
            tokens = run["usage"]["completion_tokens"]
            decode.append((tokens - 1) / (run["arrivals"][-1] - run["arrivals"][0]))
            print(f"[{i + 1}/{args.rounds}] end-to-end decode: {decode[-1]:.2f} tok/s ({tokens} tokens)", flush=True)
            baseline.append(run_baseline(str(model_dir), args.tokens))
            print(f"[{i + 1}/{args.rounds}] mlx-lm single process: {baseline[-1]:.2f} tok/s", flush=True)

        added = [client - engine for client, engine in zip(client_ttfts, engine_ttfts)]
        print()
        print(f"TTFT added by HTTP + spool over {args.requests} requests: "
              f"p50 {1000 * statistics.median(added):.1f} ms, p95 {1000 * p95(added):.1f} ms "
              f"(target p50 <= 5 ms); of which request sent -> claimed by rank 0: "
              f"p50 {1000 * statistics.median(to_claim):.1f} ms")
        print(f"TTFT p50: client {1000 * statistics.median(client_ttfts):.1f} ms, "
              f"engine alone {1000 * statistics.median(engine_ttfts):.1f} ms")
        print(f"decode, best of {args.rounds}: mlx-ring over HTTP {max(decode):.2f} tok/s, mlx-lm "
              f"{max(baseline):.2f} tok/s, ratio {max(decode) / max(baseline):.3f} (target >= 0.97); "
              f"ratio of medians {statistics.median(decode) / statistics.median(baseline):.3f}")

if __name__ == "__main__":
    main()
