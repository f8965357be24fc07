"""float32 matmul on the CPU: the mlx-cpu wheel's reference BLAS vs OpenBLAS (FAST_BLAS).

The shapes are a decode step's projection (one token, 1024 -> 2816) and the same for a
batch of 8. The BLAS is fixed per process, so each side runs in a child process with
FAST_BLAS=0 or 1, chosen by config/blas.py as the ranks do; rounds alternate so that
machine noise hits both alike. Prints the best median per side and the ratios.

    .venv/bin/python -m bench.blas [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.ring import bench_env

REPO = Path(__file__).resolve().parent.parent

SHAPES = [(1, 1024, 2816), (8, 1024, 2816)]  # rows, inner, columns
SIDES = {"reference": "0", "openblas": "1"}  # side -> FAST_BLAS


def measure() -> dict:
    """In a child: the BLAS chosen from FAST_BLAS and the median ms of each shape."""
    from config.blas import use_blas

    blas = use_blas()
    import mlx.core as mx

    medians = {}
    for rows, inner, cols in SHAPES:
        a = mx.random.normal((rows, inner))
        b = mx.random.normal((inner, cols))
        mx.eval(a, b)
        for _ in range(5):
            mx.eval(a @ b)
        times = []
        deadline = time.perf_counter() + 1.0
        while len(times) < 20 or time.perf_counter() < deadline:
            start = time.perf_counter()
            mx.eval(a @ b)
            times.append(time.perf_counter() - start)
        medians[f"{rows}x{inner} @ {inner}x{cols}"] = 1000 * sorted(times)[len(times) // 2]
    return {"blas": blas, "ms": medians}


def run_side(fast_blas: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child"],
        env=bench_env(None, FAST_BLAS=fast_blas), cwd=REPO, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return

    best: dict[str, dict[str, float]] = {side: {} for side in SIDES}
    libraries = {}
    for i in range(args.rounds):
        for side, fast_blas in SIDES.items():
            result = run_side(fast_blas)
            libraries[side] = result["blas"]
            for shape, ms in result["ms"].items():
                best[side][shape] = min(ms, best[side].get(shape, ms))
            timings = ", ".join(f"{shape} {ms:.2f} ms" for shape, ms in result["ms"].items())
            print(f"[{i + 1}/{args.rounds}] {side:9} (FAST_BLAS={fast_blas}): {timings}", flush=True)

    if not libraries["openblas"].startswith("openblas"):
        print(f"\nFAST_BLAS=1 got {libraries['openblas']!r}: OpenBLAS is missing; run ./launch.sh setup")
    print()
    print(f"{'matmul (float32)':20} {'reference ms':>12} {'openblas ms':>12} {'speed-up':>9}")
    for shape in best["reference"]:
        ref, fast = best["reference"][shape], best["openblas"][shape]
        print(f"{shape:20} {ref:12.3f} {fast:12.3f} {ref / fast:8.2f}x")
    print(f"openblas side: {libraries['openblas']}")


if __name__ == "__main__":
    main()
