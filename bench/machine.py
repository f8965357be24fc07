"""How busy this machine is, and what share of it other processes took: a benchmark
waits for a quiet machine and repeats a measurement others disturbed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.ring import TICKS, cpu_ticks

QUIET_SHARE = 0.1
QUIET_WINDOW = 3.0


def busy_ticks() -> int:
    """Clock ticks all CPUs have spent busy since boot (/proc/stat, guest time is in user)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return user + nice + system + irq + softirq + steal


def process_ticks(pids: list[int]) -> int:
    """Clock ticks `pids` have spent on the CPU (those still running)."""
    total = 0
    for pid in pids:
        try:
            total += cpu_ticks(pid)
        except OSError:
            pass
    return total


def wait_quiet(seconds: float, limit: float = QUIET_SHARE) -> float:
    """Wait up to `seconds` until the machine is at most `limit` busy over QUIET_WINDOW seconds
    (nothing of ours runs then); the last share seen."""
    deadline = time.time() + seconds
    while True:
        busy = busy_ticks()
        time.sleep(QUIET_WINDOW)
        share = (busy_ticks() - busy) / (QUIET_WINDOW * TICKS * os.cpu_count())
        if share <= limit or time.time() >= deadline:
            return share


def cpu_mark(pids: list[int]) -> tuple[float, int, int]:
    """Now, the machine's busy ticks and those of `pids`: the start of an others_since."""
    return time.perf_counter(), busy_ticks(), process_ticks(pids)


def others_since(mark: tuple[float, int, int], pids: list[int]) -> float:
    """The share of all CPUs that processes other than `pids` used since `mark`."""
    seconds = time.perf_counter() - mark[0]
    others = (busy_ticks() - mark[1]) - (process_ticks(pids) - mark[2])
    return max(others, 0) / (seconds * TICKS * os.cpu_count())
