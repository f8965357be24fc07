"""Scaling on simulated machines: mlx-ring on 2 ranks (MPI), split by tensor and by
pipeline, against one process; 1 and 8 concurrent streams.

Each rank stands for a machine: it is pinned to a core of its own (mpirun --bind-to
core; `taskset` for one process) and its BLAS gets one thread (OPENBLAS_NUM_THREADS=1),
so ranks do not borrow each other's cores as processes on one real machine would. The
API is pinned to rank 0's core, as it runs on rank 0's machine. One mlx-ring process
on one core is the baseline; mlx_lm.server on one core and its own tensor parallelism
on 2 (`mlx-lm`, `mlx-lm-tensor`) can be added for comparison. Every system is started
and measured alone, after waiting for the machine to be quiet, and each pass runs them
in the reverse order of the one before (bench/throughput.py's measurement: greedy
streaming chat completions of --tokens tokens, tok/s from `usage`). The model: the
random-weight qwen2 of 182.5M parameters, float32 (bench/bench_model.py).

Targets (issue 18, 2 simulated machines, MPI): tensor >= 1.9x one machine at 1 stream,
>= 2.1x at 8.

    .venv/bin/python -m bench.scaling [--passes 2] [--rounds 2] [--streams 1,8] [--tokens 48]
        [--systems one,pipeline-2,tensor-2,auto-2] [--model DIR] [--wait-quiet 120] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench.machine import QUIET_SHARE
from bench.throughput import measure, merge_runs, summaries
from bench.bench_model import DEFAULT_DIR, make_bench_model, parameter_count
from bench.ring import bench_env, free_port, mpi_command, start
from config.blas import DEBIAN_OPENBLAS
from distributed.world import point_mlx_at_mpi

REPO = Path(__file__).resolve().parent.parent

# name -> (label, ranks, PARALLEL for mlx-ring; None for mlx_lm.server)
SYSTEMS: dict[str, tuple[str, int, str | None]] = {
    "one": ("mlx-ring, one process", 1, "pipeline"),
    "pipeline-2": ("mlx-ring PARALLEL=pipeline", 2, "pipeline"),
    "tensor-2": ("mlx-ring PARALLEL=tensor", 2, "tensor"),
    "auto-2": ("mlx-ring PARALLEL=auto", 2, "auto"),
    "mlx-lm": ("mlx_lm.server, one process", 1, None),
    "mlx-lm-tensor": ("mlx_lm.server tensor parallel", 2, None),
}
DEFAULT_SYSTEMS = "one,pipeline-2,tensor-2,auto-2"
BASELINE = "one"
TARGETS = {1: 1.9, 8: 2.1}  # tensor-2 against one machine, by stream count


def pinned(ranks: int, command: list[str]) -> list[str]:
    """`command` as `ranks` processes, each on a core of its own."""
    if ranks == 1:
        return ["taskset", "-c", "0", *command]
    return mpi_command(ranks, *command, bind_to="core")


def launch(system: str, args: argparse.Namespace, logs: Path, spool: Path):
    """Start `system` on simulated machines: its processes, HTTP port and model name."""
    label, ranks, parallel = SYSTEMS[system]
    port = free_port()
    # One BLAS thread per simulated machine; Debian's OpenBLAS for every system alike.
    blas = {"OPENBLAS_NUM_THREADS": "1", "LD_PRELOAD": str(DEBIAN_OPENBLAS)}
    log = logs / f"scaling-{system}.log"
    log.unlink(missing_ok=True)
    if parallel is None:
        command = [sys.executable, "-m", "mlx_lm.server", "--model", args.model, "--port", str(port),
                   "--log-level", "WARNING"]
        return [start(pinned(ranks, command), dict(os.environ, **blas), log)], port, "default_model"
    env = bench_env(args.model, SPOOL_DIR=str(spool), API_PORT=str(port), PARALLEL=parallel, FAST_BLAS="1", **blas)
    ring = start(pinned(ranks, [sys.executable, str(REPO / "server.py")]), env, log)
    api = start(["taskset", "-c", "0", sys.executable, str(REPO / "api.py")], env, log)
    return [ring, api], port, args.model


def table(results: dict[str, dict[int, dict]], streams: list[int]) -> str:
    lines = ["| system | ranks | streams | tok/s | TTFT p50 (ms) | vs one process |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for n in streams:
        base = results.get(BASELINE, {}).get(n)
        for system, by_streams in results.items():
            row = by_streams[n]
            ratio = f"{row['tok_s'] / base['tok_s']:.2f}x" if base else "-"
            label, ranks, _ = SYSTEMS[system]
            lines.append(f"| {label} | {ranks} | {n} | {row['tok_s']:.2f} | {1000 * row['ttft_p50']:.0f} | {ratio} |")
    return "\n".join(lines)


def notes(results: dict, by_pass: list[dict], runs: dict) -> list[str]:
    """The targets, each pass's ratios (their spread shows the machine's drift), what
    auto chose, and how busy the rest of the machine was."""
    lines = []
    for n, target in TARGETS.items():
        if "tensor-2" in results and BASELINE in results and n in results[BASELINE]:
            ratio = results["tensor-2"][n]["tok_s"] / results[BASELINE][n]["tok_s"]
            passes = ", ".join(f"{p['tensor-2'][n]['tok_s'] / p[BASELINE][n]['tok_s']:.2f}" for p in by_pass)
            lines.append(f"tensor on 2 ranks vs one process at {n} stream(s): {ratio:.2f}x "
                         f"(target >= {target}: {'met' if ratio >= target else 'not met'}; each pass: {passes})")
    for system, run in runs.items():
        parallel = (run.get("health") or {}).get("parallel")
        if parallel and parallel.get("requested") == "auto":
            lines.append(f"{SYSTEMS[system][0]} ran {parallel['mode']}: {parallel['reason']} "
                         f"(all-reduce {parallel.get('all_reduce_us')} us, {parallel.get('bandwidth_mb_s')} MB/s, "
                         f"a layer {parallel.get('layer_ms')} ms)")
    lines.append("CPU used by other processes during each measurement: " + ", ".join(
        f"{SYSTEMS[s][0]} {100 * run['other_cpu']:.0f}%" for s, run in runs.items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="batches per stream count and pass")
    parser.add_argument("--passes", type=int, default=2, help="each pass in the reverse order of the one before")
    parser.add_argument("--streams", default="1,8", help="concurrent stream counts, comma-separated")
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens per stream")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"a subset of {','.join(SYSTEMS)}")
    parser.add_argument("--model", help=f"mlx-lm model directory (default: the bench model in {DEFAULT_DIR})")
    parser.add_argument("--wait-quiet", type=float, default=120, metavar="SECONDS",
                        help=f"wait up to this long for other processes to use <= {100 * QUIET_SHARE:.0f}%% of the CPUs")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.streams = sorted({int(n) for n in args.streams.split(",")})
    args.blas = "openblas"  # what bench.throughput.measure checks each process loaded
    systems = [s.strip() for s in args.systems.split(",")]
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}; choose from {list(SYSTEMS)}")
    if not DEBIAN_OPENBLAS.exists():
        parser.error(f"{DEBIAN_OPENBLAS} not found: run ./launch.sh setup")
    if os.cpu_count() < 2:
        parser.error("2 simulated machines need 2 cores")

    began = time.perf_counter()
    args.model = args.model or str(make_bench_model())
    point_mlx_at_mpi()  # MLX_MPI_LIBNAME for mlx_lm.server under mpirun
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    by_pass = []
    for pass_ in range(args.passes):
        print(f"pass {pass_ + 1}/{args.passes}", flush=True)
        measured = {}
        for system in systems if pass_ % 2 == 0 else systems[::-1]:
            label = f"{SYSTEMS[system][0]} on {SYSTEMS[system][1]} pinned core(s)"
            measured[system] = measure(system, args, logs, launch, label)
            runs[system] = merge_runs(runs.get(system), measured[system])
        by_pass.append(summaries(measured))
    runs = {system: runs[system] for system in systems}
    results = summaries(runs)
    setup = (f"random-weight qwen2, {parameter_count(Path(args.model)) / 1e6:.1f}M params, float32, "
             f"{args.tokens}-token streams, {args.passes} pass(es) of {args.rounds} round(s); every rank on a "
             f"core of its own, OPENBLAS_NUM_THREADS=1; {os.cpu_count()} CPUs")
    markdown, lines = table(results, args.streams), notes(results, by_pass, runs)
    print(f"\n{setup}\n\n{markdown}\n\n" + "\n".join(lines))
    (args.out / "scaling.md").write_text(f"# Scaling\n\n{setup}\n\n{markdown}\n\n" + "".join(f"- {n}\n" for n in lines))
    (args.out / "scaling.json").write_text(json.dumps({
        "model": args.model, "tokens": args.tokens, "passes": args.passes, "rounds": args.rounds,
        "machine": platform.platform(), "cpus": os.cpu_count(), "summary": results, "by_pass": by_pass,
        "runs": runs}, indent=1))
    print(f"\nwrote {args.out / 'scaling.md'} and scaling.json; {time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    main()
