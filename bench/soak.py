"""Soak under faults: REQUESTS short seeded requests from CLIENTS concurrent clients
while a rank is killed (kill -9) KILLS times at random moments, with the ring started by
`launch.sh start` and healed by its supervisor alone. A first pass with no faults gives
each request's reference text; the faulted pass must answer every request (200) with
exactly that text: nothing lost, duplicated or spliced.

    .venv/bin/python -m bench.soak [--requests 1000] [--clients 16] [--kills 5] [--ranks 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from bench.ring import REPO
from models.tiny import make_tiny_model

PROMPTS = ["The ring of machines", "Once upon a time", "def main():", "Dear diary,", "In the beginning"]


class Ring:
    """launch.sh with the soak's own settings file, spool, logs and pid files."""

    def __init__(self, root: Path, model: Path, ranks: int, kills: int) -> None:
        self.root = root
        env_file = root / "settings.env"
        env_file.write_text(f"MODEL_REPO={model}\n")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.env = dict(os.environ, MLX_RING_ENV_FILE=str(env_file), SPOOL_DIR=str(root / "spool"),
                        LOG_DIR=str(root / "logs"), RUN_DIR=str(root / "run"), API_PORT=str(port),
                        RANKS=str(ranks), BACKEND="mpi", RESTART_LIMIT=str(kills + 2), LOG_LEVEL="WARNING")
        self.url = f"http://127.0.0.1:{port}/v1"

    def launch(self, verb: str) -> None:
        subprocess.run([str(REPO / "launch.sh"), verb], env=self.env, cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)

    def heartbeat(self) -> dict:
        try:
            return json.loads((self.root / "spool" / "heartbeat.json").read_text())
        except (OSError, ValueError):
            return {}

    def supervision(self) -> dict:
        try:
            return json.loads((self.root / "spool" / "supervision.json").read_text())
        except (OSError, ValueError):
            return {}


def ask(client: openai.OpenAI, model: str, index: int) -> str:
    reply = client.completions.create(model=model, prompt=PROMPTS[index % len(PROMPTS)], max_tokens=12,
                                      seed=index, temperature=1.0)
    return reply.choices[0].text


def run_pass(ring: Ring, model: str, requests: int, clients: int) -> dict[int, str | Exception]:
    client = openai.OpenAI(base_url=ring.url, api_key="unused", timeout=300, max_retries=0)

    def one(index: int) -> str | Exception:
        try:
            return ask(client, model, index)
        except openai.APIError as err:
            return err

    with ThreadPoolExecutor(clients) as pool:
        return dict(zip(range(requests), pool.map(one, range(requests))))


def killer(ring: Ring, kills: int, ranks: int, done: threading.Event, log: list[str]) -> None:
    """Kill a random rank at a random moment while the ring serves, `kills` times; each
    next kill waits until the supervisor has the ring serving again."""
    rng = random.Random(7)
    for number in range(1, kills + 1):
        while not done.is_set():
            beat, record = ring.heartbeat(), ring.supervision()
            if beat.get("state") == "ready" and record.get("state") == "watching" \
                    and record.get("restarts", 0) == number - 1 and time.time() - beat.get("time", 0) < 2:
                break
            time.sleep(0.2)
        if done.wait(rng.uniform(1.0, 4.0)):
            return
        rank = rng.randrange(ranks)
        pid = next(r["pid"] for r in ring.heartbeat()["ranks"] if r["rank"] == rank)
        os.kill(pid, signal.SIGKILL)
        log.append(f"kill {number}: rank {rank} (pid {pid}) at {time.strftime('%H:%M:%S')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlx-ring-soak-") as tmp:
        root = Path(tmp)
        model = make_tiny_model("llama", root / "model")
        ring = Ring(root, model, args.ranks, args.kills)
        ring.launch("start")
        try:
            started = time.monotonic()
            reference = run_pass(ring, str(model), args.requests, args.clients)
            clean = time.monotonic() - started
            done, kills = threading.Event(), []
            thread = threading.Thread(target=killer, args=(ring, args.kills, args.ranks, done, kills))
            thread.start()
            started = time.monotonic()
            faulted = run_pass(ring, str(model), args.requests, args.clients)
            took = time.monotonic() - started
            done.set()
            thread.join()
            record = ring.supervision()
        finally:
            ring.launch("stop")
    failed = {i: r for i, r in faulted.items() if isinstance(r, Exception)}
    differ = [i for i, r in faulted.items() if i not in failed and r != reference[i]]
    unclean = [i for i, r in reference.items() if isinstance(r, Exception)]
    print("\n".join(kills))
    print(f"clean pass: {args.requests} requests in {clean:.1f} s ({len(unclean)} failed)")
    print(f"faulted pass: {args.requests} requests at {args.clients} clients, {len(kills)} kills, "
          f"{record.get('restarts')} supervisor restarts, in {took:.1f} s")
    print(f"answered {args.requests - len(failed)}/{args.requests}; text equal to the clean pass: "
          f"{args.requests - len(failed) - len(differ)}; different (spliced or duplicated): {len(differ)}; "
          f"failed: {len(failed)}")
    for index, err in list(failed.items())[:5]:
        print(f"  request {index} failed: {err}")
    if failed or differ or unclean or len(kills) < args.kills:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
