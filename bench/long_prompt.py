"""A long prompt's time to first token on 2 simulated machines, against one machine.

Every rank stands for a machine: pinned to a core of its own, its BLAS on one thread
(OPENBLAS_NUM_THREADS=1), on one of bench/links.py's links: MPI, the ring backend over
loopback TCP, or the ring backend through a relay delaying every chunk (--delay-ms, a
slow link). The baseline is one mlx-ring process pinned to one core. Systems: the
pipeline on 2 ranks (MICRO_BATCHES=2, so that a prompt's chunks follow each other
around the ring: pipelined prefill) and tensor parallelism on 2 ranks, on each link. Every system is started
and measured alone, after waiting for the machine to be quiet; each pass runs them in
the reverse order of the one before. A measurement is one streamed greedy chat
completion of a prompt of about --prompt-tokens tokens, different each time (and
PROMPT_CACHE_MB=0), timed to its first token.

Every system cuts prompts in chunks of --prefill-step-size tokens (PREFILL_STEP_SIZE),
the pipeline in chunks of --pipeline-step-size (PIPELINE_PREFILL_STEP_SIZE), so that by
default all chunk alike and the ratios show the split, not the chunking (on this CPU a
256-token chunk is itself faster than a 2,048-token one).

Target (issue 18): a >= 1,500-token prompt's TTFT <= 0.6x one machine, on every link.
`auto-*` systems start with PARALLEL=auto, which picks its mode for the link; with
--prefill-step-size 2048 every system runs at the shipped defaults.

    .venv/bin/python -m bench.long_prompt [--passes 2] [--rounds 1] [--prompt-tokens 1800]
        [--systems one,pipeline-mpi,tensor-mpi,pipeline-ring,tensor-ring,pipeline-slow,auto-mpi,...]
        [--prefill-step-size 256] [--pipeline-step-size 256] [--delay-ms 3] [--model DIR] [--wait-quiet 120]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

from bench.bench_model import make_bench_model
from bench.links import ranks_on
from bench.machine import QUIET_SHARE, cpu_mark, others_since, wait_quiet
from bench.ring import REPO, bench_env, descendants, free_port, start, wait_healthy
from bench.throughput import SUBJECTS, shutdown, stream_once
from config.blas import DEBIAN_OPENBLAS

# name -> (label, ranks, PARALLEL, link; None for one process)
SYSTEMS: dict[str, tuple[str, int, str, str | None]] = {
    "one": ("one process", 1, "pipeline", None),
    "pipeline-mpi": ("pipeline, MPI", 2, "pipeline", "mpi"),
    "tensor-mpi": ("tensor, MPI", 2, "tensor", "mpi"),
    "pipeline-ring": ("pipeline, ring (TCP)", 2, "pipeline", "ring"),
    "tensor-ring": ("tensor, ring (TCP)", 2, "tensor", "ring"),
    "pipeline-slow": ("pipeline, slow link", 2, "pipeline", "slow"),
    "tensor-slow": ("tensor, slow link", 2, "tensor", "slow"),
    "auto-mpi": ("auto, MPI", 2, "auto", "mpi"),
    "auto-ring": ("auto, ring (TCP)", 2, "auto", "ring"),
    "auto-slow": ("auto, slow link", 2, "auto", "slow"),
}
DEFAULT_SYSTEMS = "one,pipeline-mpi,tensor-mpi,pipeline-ring,tensor-ring,pipeline-slow"
BASELINE = "one"
TARGET = 0.6
TOKENS = 4  # generated after the prompt: TTFT is the first


def long_prompt(tokens: int, variant: int) -> str:
    """About `tokens` tokens of varied sentences (about 36 tokens each), different per `variant`."""
    sentences = [f"Note {i}: {SUBJECTS[(i + variant) % len(SUBJECTS)]} waited {i * 7 % 60} minutes "
                 f"in the rain near gate {i % 13}, counting {i * 3} boats and {i % 9} gulls." for i in range(tokens // 36)]
    return f"Summarise these notes ({variant}):\n" + "\n".join(sentences)


def launch(system: str, args: argparse.Namespace, logs: Path, spool: Path) -> tuple[list[subprocess.Popen], int]:
    """Start `system` on simulated machines; its processes and HTTP port."""
    _, ranks, parallel, link = SYSTEMS[system]
    port = free_port()
    env = bench_env(args.model, SPOOL_DIR=str(spool), API_PORT=str(port), PARALLEL=parallel,
                    MICRO_BATCHES=str(ranks), PREFILL_STEP_SIZE=str(args.prefill_step_size),
                    PIPELINE_PREFILL_STEP_SIZE=str(args.pipeline_step_size), PROMPT_CACHE_MB="0",
                    MAX_SEQUENCE_LENGTH="8192", FAST_BLAS="1", OPENBLAS_NUM_THREADS="1",
                    LD_PRELOAD=str(DEBIAN_OPENBLAS))
    env |= {"LOG_LEVEL": "INFO"}  # INFO: rank 0 logs how each prompt's chunks went
    server = [sys.executable, str(REPO / "server.py")]
    log = logs / f"long-prompt-{system}.log"
    log.unlink(missing_ok=True)
    if link is None:
        procs = [start(["taskset", "-c", "0", *server], env, log)]
    else:
        procs = ranks_on(link, ranks, server, env, log, args.delay_ms)
    api = start(["taskset", "-c", "0", sys.executable, str(REPO / "api.py")], env, log)
    return procs + [api], port


def measure(system: str, args: argparse.Namespace, logs: Path, pass_: int) -> list[dict]:
    """Start `system`, warm it up, time --rounds long prompts, stop it."""
    if (share := wait_quiet(args.wait_quiet)) > QUIET_SHARE:
        print(f"[{system}] the machine is still {100 * share:.0f}% busy; measuring anyway", flush=True)
    spool = Path(tempfile.mkdtemp(prefix="mlx-ring-long-prompt-"))
    procs, port = launch(system, args, logs, spool)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", procs=tuple(procs))
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", timeout=900, max_retries=0)
        stream_once(client, args.model, long_prompt(args.prompt_tokens // 4, -1), TOKENS)  # warm-up
        ours = [os.getpid()] + [proc.pid for proc in procs] + [pid for proc in procs for pid in descendants(proc.pid)]
        runs = []
        for round_ in range(args.rounds):
            mark = cpu_mark(ours)
            run = stream_once(client, args.model, long_prompt(args.prompt_tokens, 100 * pass_ + round_), TOKENS)
            run["other_cpu"] = others_since(mark, ours)
            print(f"[{system}] pass {pass_ + 1} round {round_ + 1}: TTFT {run['ttft']:.2f} s, "
                  f"{run['prompt_tokens']} prompt tokens, others {100 * run['other_cpu']:.0f}% CPU", flush=True)
            runs.append(run)
    finally:
        shutdown(procs, port)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=2, help="each pass in the reverse order of the one before")
    parser.add_argument("--rounds", type=int, default=1, help="long prompts per system and pass")
    parser.add_argument("--prompt-tokens", type=int, default=1800)
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"a subset of {','.join(SYSTEMS)}")
    parser.add_argument("--prefill-step-size", type=int, default=256, help="PREFILL_STEP_SIZE of every system")
    parser.add_argument("--pipeline-step-size", type=int, default=256, help="PIPELINE_PREFILL_STEP_SIZE")
    parser.add_argument("--delay-ms", type=float, default=3.0, help="the slow link's delay each way")
    parser.add_argument("--model", help="mlx-lm model directory (default: the bench model)")
    parser.add_argument("--wait-quiet", type=float, default=120, metavar="SECONDS")
    parser.add_argument("--logs", type=Path, default=REPO / "bench" / "results" / "logs")
    args = parser.parse_args()
    systems = [s.strip() for s in args.systems.split(",")]
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}; choose from {list(SYSTEMS)}")
    if not DEBIAN_OPENBLAS.exists():
        parser.error(f"{DEBIAN_OPENBLAS} not found: run ./launch.sh setup")
    args.model = args.model or str(make_bench_model())
    args.logs.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for pass_ in range(args.passes):
        for system in systems if pass_ % 2 == 0 else systems[::-1]:
            runs[system] += measure(system, args, args.logs, pass_)
    ttft = {s: statistics.median(r["ttft"] for r in runs[s]) for s in systems}
    print(f"\nrandom-weight qwen2 184M float32; prompts of {runs[systems[0]][0]['prompt_tokens']} tokens; "
          f"PREFILL_STEP_SIZE={args.prefill_step_size}, PIPELINE_PREFILL_STEP_SIZE={args.pipeline_step_size}; "
          f"{args.passes} pass(es) of {args.rounds} round(s); every rank on a core of its own, one BLAS thread\n")
    print("| system | ranks | TTFT median (s) | each | vs one process | others' CPU |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for s in systems:
        label, ranks = SYSTEMS[s][:2]
        ratio = f"{ttft[s] / ttft[BASELINE]:.2f}x" if BASELINE in ttft else "-"
        each = ", ".join(f"{r['ttft']:.2f}" for r in runs[s])
        others = max(r["other_cpu"] for r in runs[s])
        print(f"| {label} | {ranks} | {ttft[s]:.2f} | {each} | {ratio} | <= {100 * others:.0f}% |")
    if BASELINE in ttft:
        for s in systems[1:] if systems[0] == BASELINE else systems:
            if s != BASELINE:
                ratio = ttft[s] / ttft[BASELINE]
                print(f"{SYSTEMS[s][0]}: {ratio:.2f}x one process (target <= {TARGET}: "
                      f"{'met' if ratio <= TARGET else 'not met'})")
    print(f"\n{time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    main()
