"""Single-stream decode speed: a 2-rank MPI pipeline vs single-process mlx-lm.

Both run the same model, greedy, the same prompt and token count, in the same
run, alternating so that machine noise hits both alike. Prints a table and the
ratio of best-of-N decode tokens/s (target >= 0.97).

    .venv/bin/python -m bench.pipeline_decode [--model DIR | --family deepseek_v2] [--tokens 64] [--rounds 3]

`--family deepseek_v2` measures a mixture-of-experts model with latent attention
(bench/bench_model.py's, written on first use).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.bench_model import FAMILIES, family_model
from bench.ring import bench_env, mpi_ranks

REPO = Path(__file__).resolve().parent.parent

PROMPT = "Tell me a short story about a lighthouse keeper and a storm."

# Run in a child process so that both sides start equally cold, with the ranks' settings
# and so the ranks' BLAS (chosen before MLX is imported, see config/blas.py).
BASELINE = """
import json, sys, time
from config.blas import use_blas
use_blas()
import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
model, tok = load(sys.argv[1])
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True)
stamps = []
for token, _ in generate_step(mx.array(ids), model, max_tokens=int(sys.argv[3])):
    stamps.append(time.perf_counter())
print(json.dumps({"decode_tokens_per_second": (len(stamps) - 1) / (stamps[-1] - stamps[0])}))
"""


def run_baseline(model: str, tokens: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", BASELINE, model, PROMPT, str(tokens)],
        env=bench_env(model), cwd=REPO, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["decode_tokens_per_second"]


def run_pipeline(model: str, tokens: int, ranks: int) -> float:
    cmd = mpi_ranks(ranks, "--prompt", PROMPT, "--chat", "--max-tokens", str(tokens), "--json")
    out = subprocess.run(cmd, env=bench_env(model, PARALLEL="pipeline"), capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if len(result["token_ids"]) < tokens:
        raise SystemExit(f"the pipeline stopped after {len(result['token_ids'])} tokens; use a longer prompt")
    return result["timings"]["decode_tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="mlx-lm model directory (default: the embedded default model)")
    parser.add_argument("--family", choices=sorted(FAMILIES), help="a bench model instead (bench/bench_model.py)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()

    if args.family is not None:
        args.model = str(family_model(args.family))
    elif args.model is None:
        from config import load_settings
        from models import resolve_model

        args.model = resolve_model(None, load_settings().model_cache_dir)

    baseline, pipeline = [], []
    for i in range(args.rounds):
        baseline.append(run_baseline(args.model, args.tokens))
        print(f"[{i + 1}/{args.rounds}] mlx-lm single process: {baseline[-1]:6.2f} tok/s", flush=True)
        pipeline.append(run_pipeline(args.model, args.tokens, args.ranks))
        print(f"[{i + 1}/{args.rounds}] mlx-ring {args.ranks} ranks (MPI): {pipeline[-1]:6.2f} tok/s", flush=True)

    best_base, best_pipe = max(baseline), max(pipeline)
    print()
    print(f"{'setup':32} {'best tok/s':>10} {'all runs':>30}")
    print(f"{'mlx-lm single process':32} {best_base:10.2f} {', '.join(f'{x:.2f}' for x in baseline):>30}")
    print(f"{f'mlx-ring {args.ranks} ranks, MPI':32} {best_pipe:10.2f} {', '.join(f'{x:.2f}' for x in pipeline):>30}")
    print(f"ratio (mlx-ring / mlx-lm): {best_pipe / best_base:.3f}  (target >= 0.97)")


if __name__ == "__main__":
    main()
