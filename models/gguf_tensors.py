"""GGUF tensor data to MLX arrays: dequantized by the `gguf` package, quantized for MLX.

Every quantized GGUF type becomes MLX's affine format (groups of 32, MLX's smallest) with
the bit width of its own integer codes. Most types already are affine in groups of 32
(value = scale * code + bias: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q8_K); for them
the block's own scale and bias are kept and the codes recovered from the dequantized
values, so nothing is lost. The others are re-quantized from their dequantized values:
Q2_K, Q3_K and Q6_K have 16-wide sub-blocks that an MLX group of 32 cannot follow;
measured on the Gemma 3 270M Q4_K_M file, 6-bit groups of 32 over its Q6_K tensors add
an RMS error 0.96x the source's own rounding error (step/sqrt(12)), groups of 64 1.10x,
so 32 is kept. IQ4_NL/IQ4_XS codes index a non-uniform 16-value table whose widest gap
is twice its narrowest: uniform 4-bit steps would round coarser than the source, 5-bit
ones do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, Q4_K, dequantize
from gguf import GGMLQuantizationType as QType

if TYPE_CHECKING:
    from models.gguf_file import TensorInfo

GROUP_SIZE = 32
# MLX bits for each quantized GGUF type (see the module docstring).
QUANTIZED_BITS: dict[QType, int] = {
    QType.Q4_0: 4,
    QType.Q4_1: 4,
    QType.Q5_0: 5,
    QType.Q5_1: 5,
    QType.Q8_0: 8,
    QType.Q2_K: 2,
    QType.Q3_K: 3,
    QType.Q4_K: 4,
    QType.Q5_K: 5,
    QType.Q6_K: 6,
    QType.Q8_K: 8,
    QType.IQ4_NL: 5,
    QType.IQ4_XS: 5,
}
_SIGNED_OFFSET = {QType.Q4_0: 8, QType.Q5_0: 16, QType.Q8_0: 128}
EXACT_TYPES = {*_SIGNED_OFFSET, QType.Q4_1, QType.Q5_1, QType.Q4_K, QType.Q5_K, QType.Q8_K}
DENSE_TYPES = {QType.F32: mx.float32, QType.F16: mx.float16, QType.BF16: mx.bfloat16}
SUPPORTED_TYPES = [*DENSE_TYPES, *QUANTIZED_BITS]
FORCED_CHOICES = ("4", "6", "8", "float16")  # GGUF_QUANT
# Rows dequantized at once: bounds the float32 copy of a large embedding to ~64 MB.
_CHUNK_VALUES = 1 << 24
_Q8_K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])


@dataclass(frozen=True)
class Target:
    """What one tensor becomes: MLX affine `bits` (groups of GROUP_SIZE), else `dtype`."""

    bits: Optional[int] = None
    dtype: mx.Dtype = mx.float32
    exact: bool = False  # the source's own scales and codes, not re-quantized

    def quantization(self) -> Optional[dict[str, int]]:
        return {"group_size": GROUP_SIZE, "bits": self.bits} if self.bits else None


def target(tensor: TensorInfo, forced: Optional[str]) -> Target:
    """The MLX form of `tensor`; vectors (norms, biases) stay float32, as float16 ones
    slowed CPU decoding; `forced` (GGUF_QUANT) applies to every matrix."""
    if len(tensor.shape) == 1:
        return Target(dtype=mx.float32)
    if forced == "float16":
        return Target(dtype=mx.float16)
    bits = int(forced) if forced else QUANTIZED_BITS.get(tensor.type)
    if bits is None:
        return Target(dtype=DENSE_TYPES[tensor.type])
    return Target(bits=bits, exact=tensor.type in EXACT_TYPES and bits == QUANTIZED_BITS[tensor.type])


def read_tensor(data: np.ndarray, tensor: TensorInfo, form: Target) -> dict[str, mx.array]:
    """`tensor`'s parts in MLX ({"weight"} or {"weight", "scales", "biases"}), in row order.

    `data` is the whole file, memory-mapped. Rows are converted in chunks, so a large
    tensor never exists as float32 all at once.
    """
    shape = tuple(reversed(tensor.shape))  # GGUF lists the innermost dimension first
    raw = data[tensor.offset : tensor.offset + tensor.nbytes].view(np.ndarray)  # plain array: no memmap bookkeeping
    rows = raw.reshape(-1, tensor.nbytes // int(np.prod(shape[:-1])))
    step = max(1, _CHUNK_VALUES // shape[-1])
    parts: list[dict[str, mx.array]] = []
    for start in range(0, rows.shape[0], step):
        chunk_rows = rows[start : start + step]
        values = dequantized(chunk_rows, tensor.type)
        if form.exact:
            chunk = exact_affine(chunk_rows, values, tensor.type, form.bits)
        elif form.bits:
            weight, scales, biases = mx.quantize(mx.array(values), group_size=GROUP_SIZE, bits=form.bits)
            chunk = {"weight": weight, "scales": scales, "biases": biases}
        else:
            chunk = {"weight": mx.array(values).astype(form.dtype)}
        mx.eval(chunk)
        parts.append(chunk)
    return {
        kind: mx.concatenate([p[kind] for p in parts]).reshape(*shape[:-1], -1)
        for kind in parts[0]
    }


def exact_affine(rows: np.ndarray, values: np.ndarray, kind: QType, bits: int) -> dict[str, mx.array]:
    """MLX's triple for rows of an affine GGUF type: the blocks' own scales and biases, the
    codes recovered from the dequantized `values`, packed as MLX packs them (a
    little-endian bit stream)."""
    block_bytes = GGML_QUANT_SIZES[kind][1]
    blocks = np.ascontiguousarray(rows).reshape(rows.shape[0], -1, block_bytes)
    scales, biases = (a.reshape(rows.shape[0], -1, 1) for a in _block_affine(blocks, kind))
    offsets = values.reshape(scales.shape[0], scales.shape[1], GROUP_SIZE) - biases
    codes = np.divide(offsets, scales, out=np.zeros_like(offsets), where=scales != 0)  # 0 where a block is all zero
    # Eight codes fill `bits` bytes exactly: shift them into one 64-bit word, keep its low bytes.
    eights = np.rint(codes).clip(0, 2**bits - 1).astype(np.uint64).reshape(rows.shape[0], -1, 8)
    words = (eights << (bits * np.arange(8, dtype=np.uint64))).sum(axis=-1, dtype=np.uint64)
    packed = words[..., None].view(np.uint8)[..., :bits].reshape(rows.shape[0], -1)
    return {"weight": mx.array(packed.view(np.uint32)), "scales": mx.array(scales[..., 0]),
            "biases": mx.array(biases[..., 0])}


def _block_affine(blocks: np.ndarray, kind: QType) -> tuple[np.ndarray, np.ndarray]:
    """Scale and bias of every group of 32 in `blocks` (rows, blocks, bytes), as llama.cpp
    lays out each type; codes count from 0, so signed ones move their offset into the bias."""
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    if kind in _SIGNED_OFFSET:  # value = d * (code - offset)
        return d, -_SIGNED_OFFSET[kind] * d
    if kind in (QType.Q4_1, QType.Q5_1):  # value = d * code + m
        return d, blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    if kind == QType.Q8_K:  # one float32 scale for 256 signed 8-bit codes
        d = np.repeat(blocks[..., 0:4].copy().view(np.float32), 256 // GROUP_SIZE, axis=-1)
        return d, -128 * d
    # Q4_K, Q5_K: eight groups per block, value = d * sc * code - dmin * m.
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12))
    sc, m = (a.reshape(*blocks.shape[:2], 8).astype(np.float32) for a in (sc, m))
    return d * sc, -(dmin * m)


def dequantized(rows: np.ndarray, kind: QType) -> np.ndarray:
    """float32 values of raw GGUF rows (bytes, one row per line)."""
    if kind == QType.F32:
        return rows.view(np.float32)
    if kind == QType.F16:
        return rows.view(np.float16).astype(np.float32)
    if kind == QType.Q8_K:
        # llama.cpp's own intermediate type, which `gguf` does not read: one float32
        # scale per 256 int8 codes (bsums are only a dot-product shortcut).
        blocks = np.ascontiguousarray(rows).view(_Q8_K_BLOCK)
        return (blocks["d"][..., None] * blocks["qs"]).reshape(rows.shape[0], -1)
    return dequantize(rows, kind).astype(np.float32, copy=False)
