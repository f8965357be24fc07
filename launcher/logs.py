"""`logs`: the last lines of each rank's and the API's log, on their hosts, or all of
them followed as they grow."""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
from typing import IO

from launcher.hosts import SSH_OPTIONS, Layout, Machine


def print_tail(header: str, machine: Machine, file: str, lines: int, out: IO[str]) -> None:
    """`==> HEADER <==`, then the last `lines` lines of `file` on `machine`."""
    print(f"==> {header} <==", file=out, flush=True)
    proc = machine.shell(f"tail -n {lines} {shlex.quote(file)}")
    if proc.returncode == 0:
        out.write(proc.stdout.decode(errors="replace").replace("\r", ""))
    else:
        print("(no log)", file=out)
    out.flush()


def log_sources(layout: Layout) -> list[tuple[str, Machine, str]]:
    """(label, machine, file) of every rank's log and of the API's, on rank 0's host."""
    log_dir = layout.settings.log_dir
    sources = [(f"rank{r}", m, f"{m.path(log_dir)}/rank{r}.log") for r, m in enumerate(layout.machines)]
    return [*sources, ("api", layout.rank0, f"{layout.rank0.path(log_dir)}/api.log")]


def print_logs(layout: Layout, lines: int) -> None:
    for label, machine, file in log_sources(layout):
        print_tail(f"{label} ({machine}): {file}", machine, file, lines, sys.stdout)
    print(f"(launcher output, with every rank's stderr: {layout.settings.log_dir}/launcher.log)")


def follow_logs(layout: Layout, lines: int) -> int:
    """One `tail -F` per log, here or over ssh, each line prefixed with its source as it
    comes, until Ctrl-C. ssh gets a terminal on the host (-tt) so that the remote tail
    ends with it instead of lingering."""
    tails = []
    for label, machine, file in log_sources(layout):
        command = f"tail -n {lines} -F {shlex.quote(file)} 2>/dev/null"
        argv = ["sh", "-c", command] if machine.is_local else ["ssh", *SSH_OPTIONS, "-tt", machine.ssh, command]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        thread = threading.Thread(target=_prefix_lines, args=(label, proc.stdout), daemon=True)
        thread.start()
        tails.append(proc)
    try:
        for proc in tails:
            proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in tails:
            proc.terminate()
    return 0


def _prefix_lines(label: str, stream: IO[bytes]) -> None:
    for line in stream:
        sys.stdout.write(f"[{label}] {line.decode(errors='replace').rstrip(chr(13) + chr(10))}\n")
        sys.stdout.flush()
