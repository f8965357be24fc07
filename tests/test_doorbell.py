"""The doorbells beside the ring's links, on real sockets, one thread per rank."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from config.hosts import Host
from distributed.doorbell import Doorbell, RingBroken, connect, listen, rank_addresses


def ring_of(size: int) -> list[Doorbell]:
    """Every rank's doorbell, wired as start_cluster does: listen, share ports, connect."""
    listeners = [listen("127.0.0.1") for _ in range(size)]
    ports = [server.getsockname()[1] for server in listeners]
    with ThreadPoolExecutor(size) as pool:
        futures = [
            pool.submit(connect, listeners[r], ("127.0.0.1", ports[(r + 1) % size]), r, (r - 1) % size)
            for r in range(size)
        ]
        return [f.result(timeout=10) for f in futures]


def test_each_ring_wakes_one_wait_in_order_around_the_ring() -> None:
    bells = ring_of(3)
    for _ in range(5):  # one message per link, rank 0 -> 1 -> 2 -> 0
        bells[0].ring()
    for r in (1, 2, 0):
        for _ in range(5):
            bells[r].wait()
        if r != 0:
            for _ in range(5):
                bells[r].ring()
    for bell in bells:
        bell.incoming.settimeout(0.2)
        with pytest.raises(TimeoutError):  # nothing left over: one byte per message
            bell.incoming.recv(1)
    for bell in bells:
        bell.close()


def test_messages_and_bells_arrive_in_order_whatever_their_size() -> None:
    bells = ring_of(2)
    large = bytes(range(256)) * 8192  # 2 MiB: many TCP segments, read back whole
    sender = threading.Thread(target=lambda: (bells[0].post(b"header"), bells[0].ring(), bells[0].post(large)))
    sender.start()
    assert bells[1].take() == b"header"
    bells[1].wait()
    assert bells[1].take() == large
    sender.join(timeout=5)
    for bell in bells:
        bell.close()


def test_a_record_out_of_step_is_an_error_not_a_misread() -> None:
    bells = ring_of(2)
    bells[0].post(b"header")
    with pytest.raises(RingBroken, match="out of step"):
        bells[1].wait()  # an array was expected; a message came
    for bell in bells:
        bell.close()


def test_a_waiting_rank_sleeps_until_rung() -> None:
    bells = ring_of(2)
    woke: list[float] = []
    cpu: list[float] = []

    def waiter() -> None:
        start = time.thread_time()
        bells[1].wait()
        woke.append(time.perf_counter())
        cpu.append(time.thread_time() - start)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.5)
    assert not woke
    rung = time.perf_counter()
    bells[0].ring()
    thread.join(timeout=5)
    assert woke and woke[0] >= rung
    # Blocked in the kernel, not polling: both MLX backends' receives would have spun.
    assert cpu[0] < 0.1
    for bell in bells:
        bell.close()


def test_a_dead_neighbour_wakes_the_waiting_rank_with_an_error() -> None:
    bells = ring_of(2)
    errors: list[Exception] = []

    def waiter() -> None:
        try:
            bells[1].wait()
        except RingBroken as err:
            errors.append(err)

    thread = threading.Thread(target=waiter)
    thread.start()
    bells[0].close()  # what the kernel does for a rank process that dies
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert errors and "rank 0 is gone" in str(errors[0])
    bells[1].close()


def test_a_stranger_at_the_doorbell_is_refused() -> None:
    server = listen("127.0.0.1")
    stranger = socket.create_connection(server.getsockname())
    stranger.sendall(b"\x00\x00\x00\x07")  # claims to be rank 7
    target = listen("127.0.0.1")
    with pytest.raises(RingBroken, match="expected rank 1"):
        connect(server, target.getsockname(), 0, 1)
    stranger.close()
    target.close()


def test_rank_addresses_come_from_the_cluster_hosts() -> None:
    assert rank_addresses(2, []) == ["127.0.0.1", "127.0.0.1"]
    hosts = [Host("10.0.0.1"), Host("me@10.0.0.2"), Host("mac3", ("192.168.2.3",))]
    assert rank_addresses(3, hosts) == ["10.0.0.1", "10.0.0.2", "192.168.2.3"]
    with pytest.raises(ValueError, match="2 hosts for a ring of 3"):
        rank_addresses(3, hosts[:2])


def test_an_idle_rank_learns_at_a_check_that_its_neighbour_is_gone() -> None:
    bells = ring_of(2)
    bells[0].check()  # alive and silent: returns at once
    bells[1].ring()
    bells[0].check()  # a record waiting is no loss, and stays to be read
    bells[0].wait()
    bells[1].close()
    with pytest.raises(RingBroken, match="rank 1 is gone"):
        bells[0].check()
    bells[0].close()
