"""Moving arrays and messages between neighbouring ranks, and rank 0's flow control.

Neighbour-only, as MLX's ring backend requires. Arrays (hidden states, logits) go over
MLX, each announced on the next rank's doorbell just before the send, and every
receive waits for that announcement first, so a waiting rank sleeps in the kernel
instead of busy-polling. Rank 0's messages go over the doorbell's connection itself.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from distributed.doorbell import Doorbell
from distributed.messages import Header
from distributed.shard import Stage


@dataclass
class StepWork:
    """One step on one rank: what to compute, then the send to the next rank (None
    on a single rank), so the next rank's doorbell rings between the two; `then`,
    a second compute and send that follow (the last rank's half of a shared head)."""

    compute: list
    send: Optional[mx.array] = None
    then: Optional["StepWork"] = None


class Transport:
    """This rank's links to its neighbours; on rank 0, also the steps in flight."""

    def __init__(self, stage: Stage, world: mx.distributed.Group, bell: Optional[Doorbell] = None):
        self.stage = stage
        self.world = world
        self.bell = bell  # None on a single rank
        # Rank 0: started steps whose output is not sent yet, each with the number of
        # results expected before it, and the results due back (lists of arrays, each
        # announced by a bell), in launch order.
        self.unsent: deque[tuple[int, StepWork]] = deque()
        self.due: deque[list[mx.array]] = deque()
        self.expected = 0

    def start(self, work: StepWork) -> None:
        """Rank 0: compute a step in the background; its output is sent at `flush`."""
        mx.async_eval(work.compute)
        if work.send is not None:
            self.unsent.append((self.expected, work))

    def expect(self, results: list[mx.array]) -> None:
        """Rank 0: the results of the step just started, to receive in this order."""
        self.due.append(results)
        self.expected += 1

    def flush(self) -> None:
        """Rank 0: send the outputs of started steps, each once it is computed.

        A send larger than the backend's buffers waits for its receiver, and the last
        rank sends rank 0 results as large (logits). With every rank blocked in a send
        to the next, the ring would hang, and each blocked rank holds another step: so
        before a send, rank 0 receives older results until fewer than the ranks after
        it are still due."""
        while self.unsent:
            older, work = self.unsent[0]
            if older - self._received() > self.stage.size - 2:
                self._receive_next()
            else:
                self.unsent.popleft()
                self.complete(work)

    def receive(self, results: list[mx.array]) -> None:
        """Rank 0: until `results` are in, sending the steps they come from first."""
        while any(due is results for due in self.due):
            if self.unsent and self.unsent[0][0] <= self._received():
                self.complete(self.unsent.popleft()[1])
            else:
                self._receive_next()

    def _received(self) -> int:
        return self.expected - len(self.due)

    def _receive_next(self) -> None:
        for data in self.due.popleft():
            self.arrived(data)

    def complete(self, work: Optional[StepWork]) -> None:
        """Compute a step, then send its output on (announced first)."""
        while work is not None:
            mx.eval(work.compute)
            if work.send is not None:
                self.bell.ring()
                mx.eval(work.send)
            work = work.then

    def arrived(self, data: mx.array) -> mx.array:
        """A lazy receive from the previous rank, once it is there."""
        self.bell.wait()
        mx.eval(data)
        return data

    def send(self, data: mx.array) -> mx.array:
        """A lazy send to the next rank; `complete` announces and evaluates it."""
        return mx.distributed.send(data, self.stage.next_rank, group=self.world)

    def receive_array(self, shape: tuple, dtype: mx.Dtype) -> mx.array:
        """A lazy receive from the previous rank; `arrived` waits for it."""
        return mx.distributed.recv(shape, dtype, self.stage.prev_rank, group=self.world)

    def broadcast(self, header: Header, payload: bytes = b"") -> None:
        """Rank 0: start a message around the ring; a started step's output goes
        first, as the next rank expects it right after that step's header."""
        if self.stage.size > 1:
            self.flush()
            self.bell.post(header.encode(payload))

    def take(self) -> tuple[Header, bytes]:
        """Other ranks: the next message from rank 0, passed on (the last rank doesn't)."""
        message = self.bell.take()
        if not self.stage.is_last:
            self.bell.post(message)
        return Header.decode(message)

    def check_ring(self) -> None:
        """Rank 0, idle: raise RingBroken if a rank is gone. A rank whose previous
        rank died leaves too, so any loss reaches rank 0's own doorbell."""
        if self.bell is not None:
            self.bell.check()
