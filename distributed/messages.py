"""Rank 0's messages around the ring: the operations, and the header each message starts with.

Rank 0 decides everything and sends each decision to the other ranks as a message;
every rank applies the messages in the order they arrive, so all ranks' tables stay
alike (see `distributed.batch_table`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum


class Op(IntEnum):
    STOP = 0
    START = 1
    STEP = 2
    MERGE = 3
    PREPARE = 4
    LEAVE = 5
    EVICT = 6
    TRIM = 7


SAMPLE = 1  # STEP flag

_HEADER = struct.Struct("!5i")  # op, batch, seq, length, flag


@dataclass(frozen=True)
class Header:
    """The start of every message from rank 0.

    STOP: the other ranks are released.
    START: `batch` and `seq` are new ids; the JSON payload is the sequence's work.
    STEP: `length` tokens per row; `flag` holds SAMPLE when the step computes logits.
    MERGE: `seq` is the batch merged into `batch`.
    PREPARE: `batch`'s rows are prefilled together next; the JSON payload says how.
    LEAVE: `seq` leaves `batch`; with `flag`, its cache is stored as entry `length`.
    EVICT: `seq` is the stored entry to drop.
    TRIM: `batch`'s caches forget their last `length` tokens (proposals a
    verification step rejected).
    """

    op: Op
    batch: int = 0
    seq: int = 0
    length: int = 0
    flag: int = 0

    def encode(self, payload: bytes = b"") -> bytes:
        return _HEADER.pack(self.op, self.batch, self.seq, self.length, self.flag) + payload

    @classmethod
    def decode(cls, message: bytes) -> tuple["Header", bytes]:
        """The header a message starts with, and its payload."""
        op, *fields = _HEADER.unpack(message[: _HEADER.size])
        return cls(Op(op), *fields), message[_HEADER.size :]
