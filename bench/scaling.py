"""Scaling on simulated machines: mlx-ring on 2 ranks, split by tensor and by pipeline,
against one process; 1 and 8 concurrent streams; on MPI, on MLX's ring backend, and on
a slow link (the ring backend through a relay delaying every chunk, bench/links.py).

Each rank stands for a machine: it is pinned to a core of its own (mpirun --bind-to
core, `taskset` for one process and for the ring backend's ranks, which are started
without a launcher) and its BLAS gets one thread (OPENBLAS_NUM_THREADS=1),
so ranks do not borrow each other's cores as processes on one real machine would. The
API is pinned to rank 0's core, as it runs on rank 0's machine. One mlx-ring process
on one core is the baseline; mlx_lm.server on one core and its own tensor parallelism
on 2 (`mlx-lm`, `mlx-lm-tensor`) can be added for comparison. Every system is started
and measured alone, after waiting for the machine to be quiet, and each pass runs them
in the reverse order of the one before (bench/throughput.py's measurement: greedy
streaming chat completions of --tokens tokens, tok/s from `usage`). The model: the
random-weight qwen2 of 182.5M parameters, float32 (bench/bench_model.py).

A 2-rank system is named for its link (`auto-2@slow`); one named without a link is
measured on each of --links. Targets (issue 18, 2 simulated machines): on MPI, tensor >=
1.9x one machine at 1 stream, >= 2.1x at 8; on the ring backend, auto >= mlx_lm.server's
tensor parallel; on the slow link, auto runs the faster of the two modes, >= 0.95x one
machine at 1 stream and >= 1.0x at 8, and >= 1.3x mlx_lm.server's tensor parallel.

    .venv/bin/python -m bench.scaling [--passes 2] [--rounds 2] [--streams 1,8] [--tokens 48]
        [--systems one,pipeline-2,tensor-2,auto-2,mlx-lm-tensor] [--links mpi,ring,slow] [--delay-ms 3]
        [--model DIR] [--wait-quiet 120] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench.links import LINKS, describe, ranks_on
from bench.machine import QUIET_SHARE
from bench.plot import plot
from bench.throughput import measure, merge_runs, summaries
from bench.bench_model import DEFAULT_DIR, make_bench_model, parameter_count
from bench.ring import bench_env, free_port, start
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
DEFAULT_SYSTEMS = "one,pipeline-2,tensor-2,auto-2,mlx-lm-tensor"
BASELINE = "one"
TARGETS = {1: 1.9, 8: 2.1}  # tensor on MPI against one machine, by stream count
SLOW_TARGETS = {1: 0.95, 8: 1.0}  # auto on the slow link against one machine
SLOW_VS_MLX_LM = 1.3  # auto on the slow link against mlx_lm.server's tensor parallel there


def parts(system: str) -> tuple[str, str | None]:
    """`auto-2@slow` -> ("auto-2", "slow"); a one-process system has no link."""
    name, _, link = system.partition("@")
    return name, link or None


def label(system: str, delay_ms: float) -> str:
    name, link = parts(system)
    return SYSTEMS[name][0] + (f" ({describe(link, delay_ms)})" if link else "")


def expand(systems: str, links: list[str]) -> list[str]:
    """The systems to measure: a 2-rank one named without a link, on each of `links`."""
    out = []
    for system in (s.strip() for s in systems.split(",")):
        name, link = parts(system)
        if name not in SYSTEMS or (link is not None and link not in LINKS):
            raise ValueError(f"unknown system {system!r}: choose from {list(SYSTEMS)}, @ one of {list(LINKS)}")
        ranks = SYSTEMS[name][1]
        out += [name] if ranks == 1 else [system] if link else [f"{name}@{each}" for each in links]
    return out


def launch(system: str, args: argparse.Namespace, logs: Path, spool: Path):
    """Start `system` on simulated machines: its processes, HTTP port and model name."""
    name, link = parts(system)
    _, ranks, parallel = SYSTEMS[name]
    port = free_port()
    # One BLAS thread per simulated machine; Debian's OpenBLAS for every system alike.
    blas = {"OPENBLAS_NUM_THREADS": "1", "LD_PRELOAD": str(DEBIAN_OPENBLAS)}
    log = logs / f"scaling-{system}.log"
    log.unlink(missing_ok=True)

    def pinned(command: list[str], env: dict[str, str]) -> list:
        if ranks == 1:
            return [start(["taskset", "-c", "0", *command], env, log)]
        return ranks_on(link, ranks, command, env, log, args.delay_ms)

    if parallel is None:
        command = [sys.executable, "-m", "mlx_lm.server", "--model", args.model, "--port", str(port),
                   "--log-level", "WARNING"]
        return pinned(command, dict(os.environ, **blas)), port, "default_model"
    # Micro-batches: one per machine, as on real machines (on one host mlx-ring's default
    # is one, its ranks sharing the host's cores; here each has a core of its own).
    env = bench_env(args.model, SPOOL_DIR=str(spool), API_PORT=str(port), PARALLEL=parallel, FAST_BLAS="1",
                    MICRO_BATCHES=str(ranks), **blas)
    ring = pinned([sys.executable, str(REPO / "server.py")], env)
    api = start(["taskset", "-c", "0", sys.executable, str(REPO / "api.py")], env, log)
    return [*ring, api], port, args.model


def table(results: dict[str, dict[int, dict]], streams: list[int], delay_ms: float) -> str:
    lines = ["| system | link | ranks | streams | tok/s | TTFT p50 (ms) | vs one process |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for n in streams:
        base = results.get(BASELINE, {}).get(n)
        for system, by_streams in results.items():
            row = by_streams[n]
            ratio = f"{row['tok_s'] / base['tok_s']:.2f}x" if base else "-"
            name, link = parts(system)
            lines.append(f"| {SYSTEMS[name][0]} | {describe(link, delay_ms) if link else '-'} | {SYSTEMS[name][1]} "
                         f"| {n} | {row['tok_s']:.2f} | {1000 * row['ttft_p50']:.0f} | {ratio} |")
    return "\n".join(lines)


def ratio_line(results: dict, by_pass: list[dict], system: str, other: str, n: int, target: float,
               what: str) -> list[str]:
    """`system`'s tok/s over `other`'s at `n` streams against `target`, with each pass's
    ratio (their spread shows the machine's drift); nothing if either was not measured."""
    if n not in results.get(system, {}) or n not in results.get(other, {}):
        return []
    ratio = results[system][n]["tok_s"] / results[other][n]["tok_s"]
    passes = ", ".join(f"{p[system][n]['tok_s'] / p[other][n]['tok_s']:.2f}" for p in by_pass)
    return [f"{what} at {n} stream(s): {ratio:.2f}x (target >= {target}: "
            f"{'met' if ratio >= target else 'not met'}; each pass: {passes})"]


def notes(results: dict, by_pass: list[dict], runs: dict, delay_ms: float) -> list[str]:
    """The targets, what auto chose, and how busy the rest of the machine was."""
    lines = []
    for n, target in TARGETS.items():
        lines += ratio_line(results, by_pass, "tensor-2@mpi", BASELINE, n, target, "tensor on MPI vs one process")
    for n in (1, 8):
        lines += ratio_line(results, by_pass, "auto-2@ring", "mlx-lm-tensor@ring", n, 1.0,
                            "auto on the ring backend vs mlx_lm.server's tensor parallel there")
    for n, target in SLOW_TARGETS.items():
        lines += ratio_line(results, by_pass, "auto-2@slow", BASELINE, n, target, "auto on the slow link vs one process")
        lines += ratio_line(results, by_pass, "auto-2@slow", "mlx-lm-tensor@slow", n, SLOW_VS_MLX_LM,
                            "auto on the slow link vs mlx_lm.server's tensor parallel there")
    for system, run in runs.items():
        parallel = (run.get("health") or {}).get("parallel")
        if not (parallel and parallel.get("requested") == "auto"):
            continue
        lines.append(f"{label(system, delay_ms)} ran {parallel['mode']}: {parallel['reason']} "
                     f"(all-reduce {parallel.get('all_reduce_us')} us, ring trip {parallel.get('ring_trip_us')} us, "
                     f"{parallel.get('bandwidth_mb_s')} MB/s, a layer {parallel.get('layer_ms')} ms)")
        link = parts(system)[1]
        modes = {mode: results.get(f"{mode}-2@{link}") for mode in ("pipeline", "tensor")}
        for n in results[system]:
            if all(r and n in r for r in modes.values()):
                faster = max(modes, key=lambda mode: modes[mode][n]["tok_s"])
                lines.append(f"  at {n} stream(s) {faster} was faster on this link: auto's choice "
                             f"{'right' if faster == parallel['mode'] else 'wrong'}")
    lines.append("CPU used by other processes during each measurement: " + ", ".join(
        f"{label(s, delay_ms)} {100 * run['other_cpu']:.0f}%" for s, run in runs.items()))
    return lines


def plots(results: dict, streams: list[int], links: list[str], delay_ms: float, out: Path) -> list[Path]:
    """One bar chart per link, with the one-process systems beside its 2-rank ones."""
    paths = []
    for link in links:
        shown = {s: r for s, r in results.items() if parts(s)[1] in (None, link)}
        if len(shown) > sum(parts(s)[1] is None for s in shown):
            path = out / f"scaling-{link}.png"
            plot(shown, {s: SYSTEMS[parts(s)[0]][0] for s in shown}, streams,
                 f"2 simulated machines, {describe(link, delay_ms)}: aggregate tok/s", path)
            paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="batches per stream count and pass")
    parser.add_argument("--passes", type=int, default=2, help="each pass in the reverse order of the one before")
    parser.add_argument("--streams", default="1,8", help="concurrent stream counts, comma-separated")
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens per stream")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS,
                        help=f"a subset of {','.join(SYSTEMS)}, a 2-rank one optionally @link")
    parser.add_argument("--links", default=",".join(LINKS), help="the links for 2-rank systems named without one")
    parser.add_argument("--delay-ms", type=float, default=3.0, help="the slow link's delay per chunk, each way")
    parser.add_argument("--model", help=f"mlx-lm model directory (default: the bench model in {DEFAULT_DIR})")
    parser.add_argument("--wait-quiet", type=float, default=120, metavar="SECONDS",
                        help=f"wait up to this long for other processes to use <= {100 * QUIET_SHARE:.0f}%% of the CPUs")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.streams = sorted({int(n) for n in args.streams.split(",")})
    args.blas = "openblas"  # what bench.throughput.measure checks each process loaded
    links = [link.strip() for link in args.links.split(",")]
    if unknown := set(links) - set(LINKS):
        parser.error(f"unknown links {sorted(unknown)}; choose from {list(LINKS)}")
    try:
        systems = expand(args.systems, links)
    except ValueError as err:
        parser.error(str(err))
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
            ranks = SYSTEMS[parts(system)[0]][1]
            measured[system] = measure(system, args, logs, launch, f"{label(system, args.delay_ms)} on {ranks} "
                                       "pinned core(s)")
            runs[system] = merge_runs(runs.get(system), measured[system])
        by_pass.append(summaries(measured))
    runs = {system: runs[system] for system in systems}
    results = summaries(runs)
    setup = (f"random-weight qwen2, {parameter_count(Path(args.model)) / 1e6:.1f}M params, float32, "
             f"{args.tokens}-token streams, {args.passes} pass(es) of {args.rounds} round(s); every rank on a "
             f"core of its own, OPENBLAS_NUM_THREADS=1; {os.cpu_count()} CPUs")
    markdown, lines = table(results, args.streams, args.delay_ms), notes(results, by_pass, runs, args.delay_ms)
    print(f"\n{setup}\n\n{markdown}\n\n" + "\n".join(lines))
    used = {parts(s)[1] for s in systems} - {None}
    pngs = plots(results, args.streams, [link for link in links if link in used], args.delay_ms, args.out)
    (args.out / "scaling.md").write_text(f"# Scaling\n\n{setup}\n\n{markdown}\n\n" + "".join(f"- {n}\n" for n in lines))
    (args.out / "scaling.json").write_text(json.dumps({
        "model": args.model, "tokens": args.tokens, "delay_ms": args.delay_ms, "passes": args.passes, "rounds": args.rounds,
        "machine": platform.platform(), "cpus": os.cpu_count(), "summary": results, "by_pass": by_pass,
        "runs": runs}, indent=1))
    print(f"\nwrote {args.out / 'scaling.md'}, scaling.json and {', '.join(p.name for p in pngs)}; "
          f"{time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    main()
