"""Single-stream decode speed: a 2-rank MPI pipeline vs single-process mlx-lm.

Both run the same model, greedy, the same prompt and token count, in the same
run, alternating which goes first so that machine noise hits both alike; they
must generate the same tokens. Each rank stands for a machine: pinned to a core
of its own (mpirun --bind-to core) with a one-thread BLAS (OPENBLAS_NUM_THREADS=1),
against mlx-lm in one process pinned to one core with the same BLAS. Prints the
load, a table and the ratio of best-of-N decode tokens/s (target >= 0.97).

    .venv/bin/python -m bench.pipeline_decode [--model DIR | --family deepseek_v2] [--tokens 64] [--rounds 3]

`--family deepseek_v2` measures a mixture-of-experts model with latent attention
(bench/bench_model.py's, written on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.bench_model import FAMILIES, family_model
from bench.ring import bench_env, mpi_ranks

REPO = Path(__file__).resolve().parent.parent

# One BLAS thread per simulated machine: with more, a process would compute on the
# other rank's core.
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1"}

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
stamps, token_ids = [], []
for token, _ in generate_step(mx.array(ids), model, max_tokens=int(sys.argv[3])):
    stamps.append(time.perf_counter())
    token_ids.append(int(token))
print(json.dumps({"decode_tokens_per_second": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "token_ids": token_ids}))
"""


def run_baseline(model: str, tokens: int) -> tuple[float, list[int]]:
    """mlx-lm in one process pinned to core 0: decode tok/s and the token ids."""
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", BASELINE, model, PROMPT, str(tokens)],
        env=bench_env(model, **ONE_THREAD), cwd=REPO, capture_output=True, text=True, check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["decode_tokens_per_second"], result["token_ids"]


def run_pipeline(model: str, tokens: int, ranks: int) -> tuple[float, list[int]]:
    """mlx-ring's one-shot mode on `ranks` ranks, each pinned to its core: decode tok/s and the token ids."""
    cmd = mpi_ranks(ranks, "--prompt", PROMPT, "--chat", "--max-tokens", str(tokens), "--json", bind_to="core")
    env = bench_env(model, PARALLEL="pipeline", **ONE_THREAD)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if len(result["token_ids"]) < tokens:
        raise SystemExit(f"the pipeline stopped after {len(result['token_ids'])} tokens; use a longer prompt")
    return result["timings"]["decode_tokens_per_second"], result["token_ids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="mlx-lm model directory (default: the embedded default model)")
    parser.add_argument("--family", choices=sorted(FAMILIES), help="a bench model instead (bench/bench_model.py)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    if args.ranks > (os.cpu_count() or 1):
        parser.error(f"--ranks {args.ranks}: each rank needs a core of its own, this machine has {os.cpu_count()}")

    if args.family is not None:
        args.model = str(family_model(args.family))
    elif args.model is None:
        from config import load_settings
        from models import resolve_model

        args.model = resolve_model(None, load_settings().model_cache_dir)

    systems = {
        "mlx-lm single process": lambda: run_baseline(args.model, args.tokens),
        f"mlx-ring {args.ranks} pinned ranks (MPI)": lambda: run_pipeline(args.model, args.tokens, args.ranks),
    }
    speeds: dict[str, list[float]] = {name: [] for name in systems}
    tokens: dict[str, list[int]] = {}
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for i in range(args.rounds):
        # Alternate which system goes first, so a drift in machine speed favours neither.
        for name in list(systems)[:: 1 if i % 2 == 0 else -1]:
            speed, tokens[name] = systems[name]()
            speeds[name].append(speed)
            print(f"[{i + 1}/{args.rounds}] {name}: {speed:6.2f} tok/s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    baseline_ids, pipeline_ids = tokens.values()
    if baseline_ids[: args.tokens] != pipeline_ids[: args.tokens]:
        raise SystemExit("the two systems generated different tokens: they did not do the same work")

    (base_name, baseline), (pipe_name, pipeline) = speeds.items()
    best_base, best_pipe = max(baseline), max(pipeline)
    print()
    print(f"{'setup':32} {'best tok/s':>10} {'all runs':>30}")
    print(f"{base_name:32} {best_base:10.2f} {', '.join(f'{x:.2f}' for x in baseline):>30}")
    print(f"{pipe_name:32} {best_pipe:10.2f} {', '.join(f'{x:.2f}' for x in pipeline):>30}")
    print(f"ratio (mlx-ring / mlx-lm): {best_pipe / best_base:.3f}  (target >= 0.97)")


if __name__ == "__main__":
    main()
