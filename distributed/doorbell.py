"""A doorbell beside each ring link, so that a waiting rank sleeps instead of spinning.

Both MLX backends busy-poll a pending receive: a rank waiting for its neighbour
burns a core (on a machine shared by several ranks, the core the computing rank
wants). So every array a rank sends to the next one is announced by one byte on
a TCP connection beside the MLX link, rung just before the send, and the receiver
blocks in the kernel on that connection before it posts its receive. Control
messages (rank 0's small headers and JSON) travel on the same connection
themselves: a socket write costs less than an MLX send, and the receiver needs
no MLX receive at all. Everything on a connection goes in order, so the receiver
always knows which kind of record comes next; the kind byte checks it.

A neighbour that dies closes its end: the waiting rank learns it at once.
"""

from __future__ import annotations

import socket
import struct
from typing import Sequence

from config.hosts import Host

# How long to keep trying the next rank's doorbell while it starts listening.
CONNECT_TIMEOUT = 30.0
_BELL = b"\x01"  # an array follows on the MLX link
_MESSAGE = b"\x02"  # a control message follows on this connection, length first
_LENGTH = struct.Struct("!I")
_HELLO = struct.Struct("!i")  # the connecting rank's number


class RingBroken(ConnectionError):
    """A neighbour rank is gone."""


class Doorbell:
    """This rank's two ends: the bell it rings at the next rank, the one it waits on."""

    def __init__(self, outgoing: socket.socket, incoming: socket.socket, prev_rank: int):
        self.outgoing = outgoing
        self.incoming = incoming
        self.prev_rank = prev_rank

    def ring(self) -> None:
        """Announce one array to the next rank; call right before sending it."""
        self._send(_BELL)

    def wait(self) -> None:
        """Sleep until the previous rank announces its next array."""
        self._expect(_BELL)

    def post(self, message: bytes) -> None:
        """Send a control message to the next rank."""
        self._send(_MESSAGE + _LENGTH.pack(len(message)) + message)

    def take(self) -> bytes:
        """Sleep until the previous rank's next control message, and return it."""
        self._expect(_MESSAGE)
        (length,) = _LENGTH.unpack(self._read(_LENGTH.size))
        return self._read(length)

    def check(self) -> None:
        """Raise RingBroken if the previous rank has closed its end; never blocks.
        For a rank with nothing in flight, which would otherwise learn it only at
        its next message."""
        try:
            if self.incoming.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                return
        except BlockingIOError:
            return
        except OSError as err:
            raise RingBroken(f"rank {self.prev_rank} is gone ({err})") from err
        raise RingBroken(f"rank {self.prev_rank} is gone (its doorbell closed)")

    def _send(self, data: bytes) -> None:
        try:
            self.outgoing.sendall(data)
        except OSError as err:
            raise RingBroken(f"the next rank is gone ({err})") from err

    def _expect(self, kind: bytes) -> None:
        got = self._read(1)
        if got != kind:
            raise RingBroken(f"rank {self.prev_rank} is out of step: record {got!r} where {kind!r} was due")

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            try:
                chunk = self.incoming.recv(size - len(data))
            except OSError as err:
                raise RingBroken(f"rank {self.prev_rank} is gone ({err})") from err
            if not chunk:
                raise RingBroken(f"rank {self.prev_rank} is gone (its doorbell closed)")
            data += chunk
        return data

    def close(self) -> None:
        self.outgoing.close()
        self.incoming.close()


def listen(address: str) -> socket.socket:
    """This rank's listening socket, on an ephemeral port: loopback only when this
    rank's address is, else every interface (a host name may resolve to loopback)."""
    server = socket.create_server(("127.0.0.1" if address == "127.0.0.1" else "", 0))
    server.settimeout(CONNECT_TIMEOUT)
    return server


def connect(server: socket.socket, next_address: tuple[str, int], rank: int, prev_rank: int) -> Doorbell:
    """Connect to the next rank's listener and accept the previous rank's connection.
    Every rank listens before any connects (the ports are exchanged in between), so
    this cannot deadlock."""
    outgoing = socket.create_connection(next_address, timeout=CONNECT_TIMEOUT)
    outgoing.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    outgoing.sendall(_HELLO.pack(rank))
    outgoing.settimeout(None)
    with server:
        incoming, _ = server.accept()
    incoming.settimeout(CONNECT_TIMEOUT)
    bell = Doorbell(outgoing, incoming, prev_rank)
    # Exactly the hello's bytes: records may already follow it.
    hello = bell._read(_HELLO.size)
    if _HELLO.unpack(hello)[0] != prev_rank:
        raise RingBroken(f"expected rank {prev_rank} at this doorbell, got {hello!r}")
    incoming.settimeout(None)
    return bell


def rank_addresses(size: int, hosts: Sequence[Host]) -> list[str]:
    """Each rank's address: its host's (from HOSTS or HOSTFILE), or this machine for
    every rank when the settings name no hosts."""
    names = [host.address for host in hosts] or ["127.0.0.1"] * size
    if len(names) != size:
        raise ValueError(f"the settings name {len(names)} hosts for a ring of {size} ranks")
    return names
