"""Rank entry point: one process per machine, started by mlx.launch or mpirun.

`python server.py --prompt TEXT` generates once and exits (checks a cluster);
without --prompt, rank 0 serves the spool and the other ranks follow it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from config import SettingsError, load_settings
from distributed.cluster import Cluster, start_cluster
from distributed.group import init_group
from distributed.pipeline import RequestError
from distributed.sampling import SamplingParams

log = logging.getLogger("server")


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
    return parser.parse_args(argv)


def setup_logging(level: str, rank: int) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
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
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    tokens: list[int] = []
    finish_reason = "length"
    try:
        steps = cluster.pipeline.generate(encode_prompt(tokenizer, args.prompt, args.chat), params, max_tokens)
        for token in steps:
            if token in tokenizer.eos_token_ids:
                finish_reason = "stop"
                break
            tokens.append(token)
        steps.close()
    except RequestError as err:
        log.error("request refused: %s", err)
        return 2
    finally:
        cluster.pipeline.shutdown()
    text = tokenizer.decode(tokens)
    if args.json:
        print(json.dumps({"text": text, "token_ids": tokens, "finish_reason": finish_reason}))
    else:
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as err:
        print(f"mlx-ring: {err}", file=sys.stderr)
        return 2
    group = init_group(settings.backend)
    setup_logging(settings.log_level, group.rank())
    try:
        cluster = start_cluster(settings, group)
    except ValueError as err:
        log.error("%s", err)
        return 2
    if args.prompt is None:
        log.error("serve mode comes with the spool; pass --prompt")
        return 2
    if cluster.stage.is_first:
        return run_once(cluster, args, args.max_tokens or settings.default_max_tokens)
    cluster.pipeline.follow()
    return 0


if __name__ == "__main__":
    sys.exit(main())
