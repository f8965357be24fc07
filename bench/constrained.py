"""What constrained decoding costs: decode tok/s of JSON-schema-constrained requests
against free-text ones on the same ring, same run, alternating rounds.

One rank (default) serving the default model behind the API; each round streams one
free-text and one constrained chat completion (sampled, seeded, max_tokens each) and
measures decode tok/s from the arrival of its first to its last text chunk, counted
from `usage`. Target (issue 20): constrained >= 0.9x free text.

    .venv/bin/python -m bench.constrained [--rounds 6] [--tokens 48] [--ranks 1] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

from bench.ring import serving

PROMPT = "Describe a city you like: its name, its country, and three facts about it."
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "country": {"type": "string"},
        "facts": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3},
    },
    "required": ["name", "country", "facts"],
}


def decode_speed(client: httpx.Client, model: str, tokens: int, seed: int, schema: dict | None) -> tuple[float, int]:
    """Decode tok/s of one streamed completion, and its completion tokens."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "temperature": 0.7, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    arrivals, usage = [], None
    with client.stream("POST", "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    count = usage["completion_tokens"]
    return (count - 1) / max(arrivals[-1] - arrivals[0], 1e-9), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--model", help="mlx-lm model directory (default: the embedded default model)")
    args = parser.parse_args()

    from models import served_name

    with serving(args.model, args.ranks) as (url, _):
        client = httpx.Client(base_url=url)
        model = served_name(args.model)
        decode_speed(client, model, 8, 0, SCHEMA)  # warm-up: the grammar tokenizer is built once
        free, constrained = [], []
        for i in range(args.rounds):
            speed, count = decode_speed(client, model, args.tokens, i, None)
            free.append(speed)
            print(f"[{i + 1}/{args.rounds}] free text: {speed:.2f} tok/s ({count} tokens)", flush=True)
            speed, count = decode_speed(client, model, args.tokens, i, SCHEMA)
            constrained.append(speed)
            print(f"[{i + 1}/{args.rounds}] constrained: {speed:.2f} tok/s ({count} tokens)", flush=True)
    ratio = statistics.median(constrained) / statistics.median(free)
    print(f"\ndecode, median of {args.rounds}: free text {statistics.median(free):.2f} tok/s, constrained "
          f"{statistics.median(constrained):.2f} tok/s, ratio {ratio:.3f} (target >= 0.90)")


if __name__ == "__main__":
    main()
