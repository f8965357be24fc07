"""Read a GGUF file's metadata and tensor table without loading tensor data.

`mx.load` reads GGUF tensors but neither reports tensor types nor refuses the ones it
cannot keep quantized (it silently turns K-quants into float16), and the `gguf`
package's reader takes seconds on a large vocabulary; this reader takes milliseconds.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from models.gguf_tensors import SUPPORTED_TYPES

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # version 1 used 32-bit counts; llama.cpp dropped it long ago
_DEFAULT_ALIGNMENT = 32

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


class UnknownTensorType(ValueError):
    """A tensor type id that no GGUF reader knows (a newer llama.cpp's, or damage)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table; `shape` is in GGUF order (innermost dimension first)."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]
    tensors: list[TensorInfo]


class _Reader:
    """Little-endian reads from a buffer that fail cleanly at its end."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise ValueError(f"header extends past the end of the file (at byte {self.pos})")
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return values

    def scalar(self, fmt: str) -> Any:
        return self.take(fmt)[0]

    def string(self) -> str:
        size = self.scalar("Q")
        if self.pos + size > len(self.buf):
            raise ValueError(f"string extends past the end of the file (at byte {self.pos})")
        raw = self.buf[self.pos : self.pos + size]
        self.pos += size
        return raw.decode("utf-8")

    def value(self, value_type: int) -> Any:
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            item_type, count = self.take("IQ")
            # Every item takes at least one byte: a garbage count fails here, not in memory.
            if count > len(self.buf) - self.pos:
                raise ValueError(f"array of {count} items extends past the end of the file")
            if item_type in _SCALAR_FORMATS:
                return list(self.take(f"{count}{_SCALAR_FORMATS[item_type]}"))
            return [self.value(item_type) for _ in range(count)]
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type])
        raise ValueError(f"unknown metadata value type {value_type}")

    def tensor(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self.string()
        n_dims = self.scalar("I")
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        shape = self.take(f"{n_dims}Q")
        type_id = self.scalar("I")
        try:
            tensor_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise UnknownTensorType(
                f"unknown GGUF tensor type {type_id} (tensor {name!r}); "
                f"supported: {', '.join(t.name for t in SUPPORTED_TYPES)}"
            ) from None
        return name, shape, tensor_type, self.scalar("Q")


def read_header(path: Path) -> GGUFHeader:
    """Parse metadata and tensor table; ValueError if the file is not a complete GGUF."""
    with open(path, "rb") as f:
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                header = _parse(buf)
                size = len(buf)
        except UnknownTensorType as err:
            raise ValueError(f"{path}: {err}") from None
        except (ValueError, struct.error, OverflowError) as err:
            raise ValueError(f"{path} is not a valid GGUF file: {err}") from err
    for tensor in header.tensors:
        end = tensor.offset + tensor.nbytes
        if end > size:
            raise ValueError(
                f"{path} is truncated: tensor {tensor.name!r} ends at byte {end} "
                f"but the file has {size} bytes"
            )
    return header


def _parse(buf: mmap.mmap) -> GGUFHeader:
    reader = _Reader(buf)
    if reader.take("4s")[0] != _MAGIC:
        raise ValueError("bad magic number")
    version = reader.scalar("I")
    if version not in _VERSIONS:
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = reader.take("QQ")
    metadata = {}
    for _ in range(n_kv):
        key = reader.string()
        metadata[key] = reader.value(reader.scalar("I"))
    raw = [reader.tensor() for _ in range(n_tensors)]
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"bad alignment {alignment!r}")
    data_start = -(-reader.pos // alignment) * alignment
    tensors = [
        TensorInfo(name, shape, kind, data_start + offset, _nbytes(name, shape, kind))
        for name, shape, kind, offset in raw
    ]
    return GGUFHeader(metadata, tensors)


def _nbytes(name: str, shape: tuple[int, ...], kind: GGMLQuantizationType) -> int:
    block, block_bytes = GGML_QUANT_SIZES[kind]
    count = math.prod(shape)
    if count % block:
        raise ValueError(f"tensor {name!r}: {count} values are not whole {kind.name} blocks")
    return count // block * block_bytes
