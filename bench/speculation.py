"""Speculative decoding, one stream: 2 ranks over MLX's ring backend, with and without it.

Each rank stands for a machine: pinned to a core of its own (taskset, by MLX_RANK) with a
one-thread BLAS (OPENBLAS_NUM_THREADS=1). One-shot greedy generation of --tokens tokens
on a "repeat this passage with one word changed" task, the case prompt lookup is for.
Each comparison runs its two configurations --rounds times, alternating, after waiting
for a quiet machine; it reports the best decode tok/s of each, their ratio, and the
speculation figures, and checks both gave the same tokens.

Comparisons (issue 24's targets):
- ngram: SPECULATION=ngram against off, on the default model (SmolLM2 4-bit): >= 1.8x;
- draft: SPECULATION=draft with the default model drafting for its float16 conversion,
  against that conversion alone: >= 1.5x;
- ngram-float32: ngram on the default model converted to float32, whose pass costs about
  the same for 1 token as for 8 on a CPU (the 4-bit model's costs about k times as much).

    .venv/bin/python -m bench.speculation [--comparisons ngram,draft] [--tokens 128]
        [--rounds 2] [--num-draft-tokens 4] [--wait-quiet 120]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.machine import QUIET_SHARE, wait_quiet
from bench.ring import bench_env
from config import Settings
from models import resolve_model

REPO = Path(__file__).resolve().parent.parent
MLX_LAUNCH = [sys.executable, "-m", "launcher.mlx_launch"]
PIN_BY_RANK = ["bash", "-c", 'exec taskset -c "$MLX_RANK" "$@"', "pin"]

PASSAGE = (
    "The harbour town woke slowly. Fishermen carried their nets down to the blue boats, gulls circled "
    "above the market, and the baker opened his shutters to let the smell of fresh bread drift along "
    "the quay. Children ran between the stalls while their parents argued about the price of mackerel "
    "and the weather that the radio had promised for the afternoon. By noon the tide had turned, the "
    "boats were out beyond the harbour wall, and the town grew quiet again under a pale sun."
)
PROMPT = f'Repeat this passage exactly, changing only the word "blue" to "green":\n\n{PASSAGE}'
TARGETS = {"ngram": 1.8, "draft": 1.5}


def converted(model: str, dtype: str) -> str:
    """The model's `dtype` conversion, made once next to the model cache."""
    from mlx_lm import convert

    path = Settings().model_cache_dir / f"{Path(model).name}-{dtype}"
    if not path.is_dir():
        convert(model, mlx_path=str(path), dequantize=True, dtype=dtype)
    return str(path)


def configurations(name: str, model: str) -> tuple[dict, dict]:
    """The baseline's settings and the speculating one's, for a comparison."""
    if name == "ngram":
        return {"MODEL_REPO": model}, {"MODEL_REPO": model, "SPECULATION": "ngram"}
    if name == "ngram-float32":
        target = converted(model, "float32")
        return {"MODEL_REPO": target}, {"MODEL_REPO": target, "SPECULATION": "ngram"}
    if name == "draft":
        target = converted(model, "float16")
        return {"MODEL_REPO": target}, {"MODEL_REPO": target, "SPECULATION": "draft", "DRAFT_MODEL": model}
    raise SystemExit(f"unknown comparison {name!r}")


def run(settings: dict, tokens: int) -> dict:
    """One-shot generation on 2 pinned ranks over the ring; rank 0's JSON."""
    server = [sys.executable, str(REPO / "server.py"), "--prompt", PROMPT, "--chat", "--max-tokens", str(tokens),
              "--json"]
    command = [*MLX_LAUNCH, "-n", "2", "--backend", "ring", "--", *PIN_BY_RANK, *server]
    env = bench_env(None) | {"BACKEND": "ring", "PARALLEL": "pipeline", "OPENBLAS_NUM_THREADS": "1"} | settings
    out = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"the ranks failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(name: str, model: str, tokens: int, rounds: int, quiet: float) -> dict:
    baseline, speculating = configurations(name, model)
    best: dict[str, dict] = {}
    for round_ in range(rounds):
        order = [("off", baseline), ("on", speculating)]
        for label, settings in order if round_ % 2 == 0 else reversed(order):
            share = wait_quiet(quiet)
            if share > QUIET_SHARE:
                print(f"  (the machine stayed {share:.0%} busy)", flush=True)
            result = run(settings, tokens)
            speed = result["timings"]["decode_tokens_per_second"]
            print(f"  {name} {label}: {speed:.2f} tok/s", flush=True)
            if label not in best or speed > best[label]["timings"]["decode_tokens_per_second"]:
                best[label] = result
    off, on = best["off"], best["on"]
    ratio = on["timings"]["decode_tokens_per_second"] / off["timings"]["decode_tokens_per_second"]
    return {
        "comparison": name, "tokens": len(on["token_ids"]),
        "same_tokens": on["token_ids"] == off["token_ids"],
        "off_tokens_per_second": off["timings"]["decode_tokens_per_second"],
        "on_tokens_per_second": on["timings"]["decode_tokens_per_second"],
        "speedup": ratio, "target": TARGETS.get(name), "speculation": on["speculation"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comparisons", default="ngram,draft")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-draft-tokens", type=int, default=Settings.model_fields["num_draft_tokens"].default)
    parser.add_argument("--wait-quiet", type=float, default=120.0, help="seconds to wait for a quiet machine")
    args = parser.parse_args()
    os.environ["NUM_DRAFT_TOKENS"] = str(args.num_draft_tokens)  # bench_env copies the environment
    model = resolve_model(None, Settings().model_cache_dir)
    results = [compare(name, model, args.tokens, args.rounds, args.wait_quiet)
               for name in args.comparisons.split(",")]
    print(f"\n{'comparison':<15}{'off tok/s':>11}{'on tok/s':>10}{'speedup':>9}{'target':>8}"
          f"{'accepted':>10}{'tok/pass':>10}  same tokens")
    for r in results:
        spec = r["speculation"]
        target = f"{r['target']:.1f}x" if r["target"] else "-"
        print(f"{r['comparison']:<15}{r['off_tokens_per_second']:>11.2f}{r['on_tokens_per_second']:>10.2f}"
              f"{r['speedup']:>8.2f}x{target:>8}{spec['acceptance_rate']:>10.0%}{spec['tokens_per_pass']:>10.2f}"
              f"  {r['same_tokens']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
