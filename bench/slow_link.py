"""A slow link between ranks on one machine: a TCP relay that delays what it forwards.

This kernel has no netem, so latency cannot be added with tc. The relay listens on a
port of its own and connects each client to the real address; every chunk it reads,
either way, is written to the other side `delay` seconds after it arrived, in order
(a link's latency, like Wi-Fi's few milliseconds; its bandwidth stays loopback's).

MLX's ring backend gives every rank the same list of addresses (MLX_HOSTFILE, a JSON
list with one list of "ip:port" per rank): rank r listens on entry r and connects to
entry r+1. So each rank gets a hostfile of its own (`ring_hostfiles`): its own entry
the real address, its neighbours' the relay's ports in front of theirs, and every
connection between ranks passes a relay.

    .venv/bin/python -m bench.slow_link --relay 6001:5001 --relay 6002:5002 [--delay-ms 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1 << 16
RELAY_NICE = -10
CONNECT_TIMEOUT = 120  # seconds the relay waits for its target to listen


class SlowLink:
    """A relay from `listen` to `target` that delays every chunk by `delay` seconds, each
    way, for every connection it accepts; runs on daemon threads until `close`."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
        self.target, self.delay = target, delay
        self.server = socket.create_server(listen, reuse_port=False)
        self.address = self.server.getsockname()[:2]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name=f"relay-{self.address[1]}").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        """Join `client` to the target, waiting for it to listen: ranks start in any
        order, and the ring backend takes an accepted connection as made."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            try:
                upstream = socket.create_connection(self.target)
                break
            except OSError as err:
                if time.monotonic() > deadline:
                    log.warning("relay %s: %s unreachable (%s)", self.address, self.target, err)
                    client.close()
                    return
                time.sleep(0.1)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sockets += [client, upstream]
        self._pipe(client, upstream)
        self._pipe(upstream, client)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        """Chunks read from `source` go to `sink` `delay` after they arrived: a reader
        stamps them, a writer sleeps until each is due, so chunks in flight overlap as on
        a link with latency."""
        queue: collections.deque = collections.deque()
        ready = threading.Condition()

        def read() -> None:
            while True:
                try:
                    data = source.recv(CHUNK)
                except OSError:
                    data = b""
                with ready:
                    queue.append((time.monotonic() + self.delay, data))
                    ready.notify()
                if not data:
                    return

        def write() -> None:
            while True:
                with ready:
                    ready.wait_for(lambda: queue)
                    due, data = queue.popleft()
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                try:
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self.server.close()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass


def ring_hostfiles(ports: list[int], relays: list[int], directory: Path, host: str = "127.0.0.1") -> list[Path]:
    """One MLX_HOSTFILE per rank for the ring backend: rank r listens on `ports[r]`
    and reaches every other rank s through `relays[s]` (a relay in front of ports[s])."""
    paths = []
    for rank in range(len(ports)):
        entries = [[f"{host}:{ports[s] if s == rank else relays[s]}"] for s in range(len(ports))]
        path = directory / f"hostfile-rank{rank}.json"
        path.write_text(json.dumps(entries))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relay", action="append", required=True, metavar="PORT:TARGET_PORT",
                        help="listen on PORT, forward to TARGET_PORT (repeat for several relays)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--delay-ms", type=float, default=3.0, help="added to every chunk, each way")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay %(message)s")
    try:
        # The relay stands for the wire, which takes no machine's core: ahead of ranks
        # that spin while they wait, it forwards when a chunk is due, not a slice later.
        os.nice(RELAY_NICE)
    except PermissionError:
        log.info("relay: not allowed to raise its priority; chunks may wait for a core")
    for relay in args.relay:
        port, _, target = relay.partition(":")
        link = SlowLink((args.host, int(port)), (args.host, int(target)), args.delay_ms / 1e3)
        log.info("%s -> %s:%s, %.1f ms each way", link.address, args.host, target, args.delay_ms)
    threading.Event().wait()


if __name__ == "__main__":
    main()
