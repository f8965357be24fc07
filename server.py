"""Rank entry point: one process per machine, started by mlx.launch or mpirun.

`python server.py --prompt TEXT` generates once and exits (checks a cluster);
without --prompt, rank 0 serves the spool and the other ranks follow it.
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys

from config import settings_or_exit
from config.blas import use_blas


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `kill -USR1 <pid>` prints where each thread of a rank is, for a ring that looks stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    settings = settings_or_exit()
    # MLX binds its BLAS when it is first imported (config/blas.py): choose it before the
    # ring's modules import MLX.
    use_blas(settings.fast_blas)
    from distributed.rank import run_rank
    from distributed.world import release_groups

    try:
        return run_rank(settings, args)
    finally:
        release_groups()


if __name__ == "__main__":
    sys.exit(main())
