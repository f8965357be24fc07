"""Throughput under concurrent streams: mlx-ring vs mlx_lm.server, same run, same model.

Measures, one system after another (each stopped, its port free, before the next):
mlx_lm.server single process, mlx_lm.server --pipeline on 2 ranks (MPI), mlx-ring
on 1 and 2 ranks (MPI); then again in reverse order (--passes), as this machine's
speed drifts by 10% and more over minutes. Each start runs a warm-up, then for
every stream count and round a batch of concurrent streaming chat completions (greedy, max_tokens each,
prompts of ~50 tokens varied per stream). Reports aggregate tok/s (completion
tokens actually generated / wall time of the batch) and time to first token
p50/p95 over all streams, as a markdown table, a PNG bar plot and the raw samples
(JSON) in --out. The model: a random-weight qwen2 of 182.5M parameters, float32,
with SmolLM2's tokenizer (bench/bench_model.py), written once. The machine may be
shared: each system waits for it to be quiet first, and the share of CPU other
processes took during each batch is printed; a batch they took over 10% of is
repeated (up to 3 times).

Fair comparison: every process of every system runs the same BLAS (--blas openblas
preloads Debian's OpenBLAS; reference preloads nothing and sets FAST_BLAS=0), and
mpirun binds CPUs as each system runs by default (--bind-to auto): mlx-ring unbound,
as launch.sh starts it, mlx_lm.server --pipeline as mpirun binds by default.

Targets (issue 6): mlx-ring on 2 ranks >= 0.97x mlx_lm.server at 1 stream,
>= 1.0x at 8 streams, >= 1.5x mlx_lm.server --pipeline at 8 streams.

    .venv/bin/python -m bench.throughput [--passes 2] [--rounds 3] [--streams 1,8] [--tokens 48]
        [--systems mlx-lm,mlx-lm-pipeline,ring-1,ring-2] [--blas openblas|reference]
        [--bind-to auto|none|core] [--model DIR] [--wait-quiet 120] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import httpx
from openai import OpenAI

REPO = Path(__file__).resolve().parent.parent

from distributed.world import point_mlx_at_mpi
from config.blas import DEBIAN_OPENBLAS, THREAD_TIMEOUT
from bench.bench_model import DEFAULT_DIR, make_bench_model, parameter_count
from bench.ring import (
    bench_env, descendants, free_port, mpi_command, mpi_ranks, port_free, start, stop,
    wait_healthy,
)
from bench.machine import QUIET_SHARE, cpu_mark, others_since, wait_quiet
from bench.plot import plot
from bench.stats import p95

# name on the command line -> (label, ranks)
SYSTEMS: dict[str, tuple[str, int]] = {
    "mlx-lm": ("mlx_lm.server", 1),
    "mlx-lm-pipeline": ("mlx_lm.server --pipeline", 2),
    "ring-1": ("mlx-ring", 1),
    "ring-2": ("mlx-ring", 2),
}
BASELINE = "mlx-lm"

SUBJECTS = (
    "a lighthouse keeper", "a mountain village", "an old clockmaker", "a lost satellite",
    "a desert caravan", "a city library", "a river ferry", "a night train", "a bee colony",
    "a chess champion", "a coral reef", "a snowed-in observatory",
)

WARMUP_TOKENS = 4
# Before each system: wait for the rest of the machine to use at most this share of the CPUs.
# A batch during which other processes took more than this share is repeated, up to REPEATS times.
BUSY_SHARE = 0.1
REPEATS = 3


def prompt(stream: int, round_: int) -> str:
    """A user message of about 25 tokens (about 50 with the chat template), different per stream and round."""
    subject = SUBJECTS[(stream + 3 * round_) % len(SUBJECTS)]
    return (f"Story {round_}.{stream}: tell me a short story about {subject} in a winter storm, "
            "with a surprising ending.")


def launch(system: str, args: argparse.Namespace, logs: Path, spool: Path) -> tuple[list[subprocess.Popen], int, str]:
    """Start `system`; its processes, HTTP port and the model name its API expects.

    Every process of every system gets the same BLAS (preloaded, so also when FAST_BLAS
    is not in effect) and mpirun's CPU binding from --bind-to: auto leaves mlx-ring
    unbound as launch.sh does, and binds mlx_lm.server --pipeline as mpirun does by
    default (one core per rank for 2 ranks)."""
    port = free_port()
    model, ranks = args.model, SYSTEMS[system][1]
    binding = args.bind_to if args.bind_to != "auto" else "core" if system == "mlx-lm-pipeline" else "none"
    extra = {}
    if args.blas == "openblas":
        # As config/blas.py sets it for mlx-ring's ranks, so every system runs the same BLAS.
        extra = {"LD_PRELOAD": str(DEBIAN_OPENBLAS),
                 "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT", THREAD_TIMEOUT)}
    log = logs / f"throughput-{system}.log"
    log.unlink(missing_ok=True)
    if system.startswith("mlx-lm"):
        command = [sys.executable, "-m", "mlx_lm.server", "--model", model, "--port", str(port),
                   "--log-level", "WARNING"]
        if system == "mlx-lm-pipeline":
            command = mpi_command(ranks, *command, "--pipeline", bind_to=binding)
        return [start(command, dict(os.environ, **extra), log)], port, "default_model"
    env = bench_env(model, SPOOL_DIR=str(spool), API_PORT=str(port),
                    FAST_BLAS="1" if args.blas == "openblas" else "0", **extra)
    ring = start(mpi_ranks(ranks, bind_to=binding), env, log)
    api = start([sys.executable, str(REPO / "api.py")], env, log)
    return [ring, api], port, model


def python_pids(procs: list[subprocess.Popen]) -> list[int]:
    """The Python processes among `procs` and their descendants."""
    pids = [proc.pid for proc in procs] + [pid for proc in procs for pid in descendants(proc.pid)]
    found = []
    for pid in pids:
        try:
            if "python" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode():
                found.append(pid)
        except OSError:
            pass
    return found


def openblas_loaded(pid: int) -> bool:
    try:
        return "libopenblas" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def shutdown(procs: list[subprocess.Popen], port: int) -> None:
    """Stop what `launch` started, kill any process of it left behind, wait for the port."""
    leftovers = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()
                 for proc in procs for pid in descendants(proc.pid) if Path(f"/proc/{pid}").exists()}
    stop(*procs)
    for pid, cmdline in leftovers.items():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.time() + 30
    while not port_free(port):
        if time.time() > deadline:
            raise SystemExit(f"port {port} still in use after stopping")
        time.sleep(0.2)


def stream_once(client: OpenAI, model: str, text: str, tokens: int) -> dict:
    """One streaming greedy chat completion: TTFT (s), completion tokens, finish reason."""
    sent = time.perf_counter()
    first, chunks, usage, finish = None, 0, None, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                chunks += 1
                first = first or time.perf_counter()
            finish = choice.finish_reason or finish
    if first is None:
        raise SystemExit(f"a stream returned no content (finish reason {finish})")
    return {
        "ttft": first - sent,
        "seconds": time.perf_counter() - sent,
        "completion_tokens": usage.completion_tokens if usage else chunks,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "finish_reason": finish,
    }


def run_batch(client: OpenAI, model: str, texts: list[str], tokens: int) -> dict:
    """All of `texts` as concurrent streams; wall time of the whole batch and each stream's record."""
    with ThreadPoolExecutor(len(texts)) as pool:
        started = time.perf_counter()
        streams = list(pool.map(lambda text: stream_once(client, model, text, tokens), texts))
        wall = time.perf_counter() - started
    return {"wall": wall, "streams": streams}


def summarize(batches: list[dict]) -> dict:
    """Aggregate tok/s over all rounds (tokens / wall time) and TTFT percentiles over all streams."""
    streams = [s for b in batches for s in b["streams"]]
    tokens = sum(s["completion_tokens"] for s in streams)
    ttfts = [s["ttft"] for s in streams]
    return {
        "tok_s": tokens / sum(b["wall"] for b in batches),
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": p95(ttfts),
        "tokens_per_stream": tokens / len(streams),
        "early_stops": sum(s["finish_reason"] != "length" for s in streams),
    }


def summaries(runs: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """`summarize` of each system's batches, by stream count."""
    return {system: {n: summarize(batches) for n, batches in run["batches"].items()} for system, run in runs.items()}


def measure(system: str, args: argparse.Namespace, logs: Path, launcher: Callable = launch,
            label: str | None = None) -> dict:
    """Start `system` with `launcher` (`launch`'s signature), warm it up, run every stream
    count for every round, stop it. Returns the batches by stream count, the share of the
    machine's CPU other processes used during the kept batches (the machine is shared: a
    high share taints them), and what its /health said once up."""
    share = wait_quiet(args.wait_quiet)
    if share > QUIET_SHARE:
        print(f"[{system}] the machine is still {100 * share:.0f}% busy after {args.wait_quiet:.0f} s; "
              "measuring anyway", flush=True)
    spool = Path(tempfile.mkdtemp(prefix="mlx-ring-throughput-"))
    began = time.perf_counter()
    label = label or f"{SYSTEMS[system][0]} on {SYSTEMS[system][1]} rank(s)"
    print(f"[{system}] starting {label}", flush=True)
    procs, port, model = launcher(system, args, logs, spool)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", procs=tuple(procs))
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        pids = python_pids(procs)
        with_openblas = sum(openblas_loaded(pid) for pid in pids)
        print(f"[{system}] up in {time.perf_counter() - began:.1f} s; OpenBLAS loaded in "
              f"{with_openblas} of {len(pids)} Python processes", flush=True)
        if (with_openblas == len(pids)) != (args.blas == "openblas"):
            print(f"[{system}] WARNING: BLAS is not what --blas {args.blas} asks for", flush=True)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", timeout=900, max_retries=0)
        run = stream_once(client, model, prompt(0, -1), args.tokens)
        run_batch(client, model, [prompt(i, -1) for i in range(max(args.streams))], WARMUP_TOKENS)
        print(f"[{system}] warm-up: TTFT {1000 * run['ttft']:.0f} ms, {run['completion_tokens']} tokens, "
              f"prompt {run['prompt_tokens']} tokens", flush=True)
        ours = [os.getpid()] + [proc.pid for proc in procs] + [pid for proc in procs for pid in descendants(proc.pid)]
        samples: dict[int, list[dict]] = {n: [] for n in args.streams}
        for round_ in range(args.rounds):
            for n in args.streams:
                texts = [prompt(i, round_) for i in range(n)]
                for attempt in range(REPEATS + 1):
                    mark = cpu_mark(ours)
                    batch = run_batch(client, model, texts, args.tokens) | {"other_cpu": others_since(mark, ours)}
                    if batch["other_cpu"] <= BUSY_SHARE or attempt == REPEATS:
                        break
                    print(f"[{system}] other processes took {100 * batch['other_cpu']:.0f}% of the CPU during "
                          f"{n} stream(s); waiting for quiet, repeating", flush=True)
                    wait_quiet(args.wait_quiet)
                samples[n].append(batch)
                tokens = sum(s["completion_tokens"] for s in batch["streams"])
                ttfts = [s["ttft"] for s in batch["streams"]]
                print(f"[{system}] round {round_ + 1}/{args.rounds}, {n} stream(s): "
                      f"{tokens / batch['wall']:6.2f} tok/s ({tokens} tokens in {batch['wall']:.1f} s), "
                      f"TTFT p50 {1000 * statistics.median(ttfts):.0f} ms, others {100 * batch['other_cpu']:.0f}% CPU",
                      flush=True)
        kept = [b for batches in samples.values() for b in batches]
        others = sum(b["other_cpu"] * b["wall"] for b in kept) / sum(b["wall"] for b in kept)
    finally:
        shutdown(procs, port)
        shutil.rmtree(spool, ignore_errors=True)
    print(f"[{system}] stopped; {time.perf_counter() - began:.0f} s in all", flush=True)
    return {"batches": samples, "other_cpu": others, "health": health}


def merge_runs(kept: dict | None, new: dict) -> dict:
    """One system's batches from several passes; other processes' CPU share weighted by time."""
    if kept is None:
        return new
    batches = {n: kept["batches"][n] + new["batches"][n] for n in new["batches"]}
    walls = [sum(b["wall"] for bs in run["batches"].values() for b in bs) for run in (kept, new)]
    others = (kept["other_cpu"] * walls[0] + new["other_cpu"] * walls[1]) / sum(walls)
    return {"batches": batches, "other_cpu": others, "health": new["health"]}


def table(results: dict[str, dict[int, dict]], streams: list[int]) -> str:
    """The markdown table: one row per system and stream count."""
    lines = [
        "| system | ranks | streams | aggregate tok/s | TTFT p50 (ms) | TTFT p95 (ms) | tokens/stream "
        "| vs mlx_lm.server |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in streams:
        for system, by_streams in results.items():
            row = by_streams[n]
            base = results.get(BASELINE, {}).get(n)
            ratio = f"{row['tok_s'] / base['tok_s']:.2f}x" if base else "-"
            lines.append(
                f"| {SYSTEMS[system][0]} | {SYSTEMS[system][1]} | {n} | {row['tok_s']:.2f} | "
                f"{1000 * row['ttft_p50']:.0f} | {1000 * row['ttft_p95']:.0f} | "
                f"{row['tokens_per_stream']:.1f} | {ratio} |"
            )
    return "\n".join(lines)


def target_lines(results: dict[str, dict[int, dict]], by_pass: list[dict[str, dict[int, dict]]],
                 streams: list[int]) -> list[str]:
    """The ratios issue 6's targets refer to, for the systems and stream counts measured:
    over all passes, and each pass's own, whose spread shows how far the machine's drift
    reaches."""
    many = max(streams)
    checks = [(BASELINE, 1, 0.97)] if 1 in streams else []
    if many > 1:
        checks += [(BASELINE, many, 1.0), ("mlx-lm-pipeline", many, 1.5)]
    lines = []
    for other, n, target in checks:
        if "ring-2" in results and other in results:
            ratio = results["ring-2"][n]["tok_s"] / results[other][n]["tok_s"]
            verdict = "met" if ratio >= target else "not met"
            passes = ", ".join(f"{run['ring-2'][n]['tok_s'] / run[other][n]['tok_s']:.3f}" for run in by_pass)
            lines.append(f"mlx-ring 2 ranks vs {SYSTEMS[other][0]} at {n} stream(s): "
                         f"{ratio:.3f} (target >= {target}, {verdict}; each pass: {passes})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="batches per stream count and pass (all kept)")
    parser.add_argument("--passes", type=int, default=2,
                        help="times every system is started and measured; each pass in the reverse order of "
                             "the one before, so that a drift in the machine's speed hits every system alike")
    parser.add_argument("--streams", default="1,8", help="concurrent stream counts, comma-separated")
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens per stream")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    parser.add_argument("--blas", choices=("openblas", "reference"), default="openblas",
                        help="openblas: every process preloads Debian's OpenBLAS; reference: the mlx-cpu wheel's")
    parser.add_argument("--bind-to", choices=("auto", "none", "core"), default="auto",
                        help="mpirun's CPU binding. none: every rank may use every core; core: one core per "
                             "rank (Open MPI's default for 1-2 ranks); auto: none for 1 rank, core for more, "
                             "as launch.sh runs them")
    parser.add_argument("--model", help=f"mlx-lm model directory (default: the bench model in {DEFAULT_DIR})")
    parser.add_argument("--wait-quiet", type=float, default=120, metavar="SECONDS",
                        help=f"before each system, wait up to this long for other processes to use "
                             f"<= {100 * QUIET_SHARE:.0f}%% of the CPUs")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.streams = sorted({int(n) for n in args.streams.split(",")})
    systems = [s.strip() for s in args.systems.split(",")]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {list(SYSTEMS)}")
    if args.blas == "openblas" and not DEBIAN_OPENBLAS.exists():
        parser.error(f"{DEBIAN_OPENBLAS} not found (apt-get install libopenblas0-pthread) or use --blas reference")

    began = time.perf_counter()
    if args.model is None:
        print(f"bench model: {DEFAULT_DIR} (written on first use)", flush=True)
        args.model = str(make_bench_model())
    params = parameter_count(Path(args.model))
    point_mlx_at_mpi()  # MLX_MPI_LIBNAME for every MPI process started below
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    order = [s for s in SYSTEMS if s in systems]
    runs: dict[str, dict] = {}
    by_pass: list[dict[str, dict[int, dict]]] = []
    for pass_ in range(args.passes):
        print(f"pass {pass_ + 1}/{args.passes}", flush=True)
        measured = {}
        for system in order if pass_ % 2 == 0 else order[::-1]:
            measured[system] = measure(system, args, logs)
            runs[system] = merge_runs(runs.get(system), measured[system])
        by_pass.append(summaries(measured))
    runs = {system: runs[system] for system in order}
    results = summaries(runs)
    others = "CPU used by other processes during each measurement: " + ", ".join(
        f"{SYSTEMS[system][0]} ({SYSTEMS[system][1]}) {100 * run['other_cpu']:.0f}%" for system, run in runs.items())

    setup = [f"random-weight qwen2, {params / 1e6:.1f}M params, float32, {args.tokens}-token streams, "
             f"{args.passes} pass(es) of {args.rounds} round(s)", f"{args.blas} BLAS, mpirun --bind-to {args.bind_to}, {os.cpu_count()} CPUs"]
    markdown = table(results, args.streams)
    targets = target_lines(results, by_pass, args.streams)
    early = sum(row["early_stops"] for by_n in results.values() for row in by_n.values())
    notes = targets + [others] + ([f"{early} stream(s) stopped before max_tokens (EOS); "
                                   "tok/s counts the tokens actually generated"] if early else [])
    print()
    print(markdown)
    print()
    print("\n".join(notes))
    (args.out / "throughput.md").write_text(
        f"# Throughput\n\n{'; '.join(setup)}\n\n{markdown}\n\n" + "".join(f"- {n}\n" for n in notes))
    labels = {key: f"{label} ({n} rank{'s' if n > 1 else ''})" for key, (label, n) in SYSTEMS.items()}
    plot(results, labels, args.streams, "\n".join(setup), args.out / "throughput.png")
    (args.out / "throughput.json").write_text(json.dumps({
        "model": args.model, "parameters": params, "blas": args.blas, "bind_to": args.bind_to,
        "tokens": args.tokens, "passes": args.passes, "rounds": args.rounds, "machine": platform.platform(), "cpus": os.cpu_count(),
        "summary": results, "runs": runs,
    }, indent=1))
    print(f"\nwrote {args.out / 'throughput.md'}, throughput.png, throughput.json; "
          f"{time.perf_counter() - began:.0f} s in all")

if __name__ == "__main__":
    main()
