"""GGUF tensor data to MLX arrays: dequantized by the `gguf` package, re-quantized to MLX affine.

Each quantized GGUF type becomes MLX's affine format with the same bit width as its integer
codes and groups of 32 (MLX's smallest). Where the source's sub-blocks are 32 wide (Q4_0..Q8_0,
Q4_K, Q5_K) a group spans at most the source's range, so the MLX step is no coarser than the
source's and the added rounding error is at most half a source step. Q2_K, Q3_K and Q6_K have
16-wide sub-blocks that MLX cannot match; measured on the Gemma 3 270M Q4_K_M file, 6-bit
groups of 32 over Q6_K data add an RMS error of 0.96x the source's own (step/sqrt(12)),
groups of 64 1.10x, so 32 is kept. IQ4_NL/IQ4_XS codes index a non-uniform 16-value table
whose widest gap is 2x its narrowest: uniform 4-bit steps would round coarser than the
source, 5-bit ones do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import dequantize

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

    def quantization(self) -> Optional[dict[str, int]]:
        return {"group_size": GROUP_SIZE, "bits": self.bits} if self.bits else None


def target(tensor: TensorInfo, forced: Optional[str]) -> Target:
    """The MLX form of `tensor`; vectors (norms, biases) stay float32, as float16 ones
    slowed CPU decoding; `forced` (GGUF_QUANT) applies to every matrix."""
    if len(tensor.shape) == 1:
        return Target(dtype=mx.float32)
    if forced == "float16":
        return Target(dtype=mx.float16)
    if forced:
        return Target(bits=int(forced))
    if tensor.type in DENSE_TYPES:
        return Target(dtype=DENSE_TYPES[tensor.type])
    return Target(bits=QUANTIZED_BITS[tensor.type])


def read_tensor(data: np.ndarray, tensor: TensorInfo, form: Target) -> dict[str, mx.array]:
    """`tensor`'s parts in MLX ({"weight"} or {"weight", "scales", "biases"}), in row order.

    `data` is the whole file, memory-mapped. Rows are converted in chunks, so a large
    tensor never exists as float32 all at once.
    """
    shape = tuple(reversed(tensor.shape))  # GGUF lists the innermost dimension first
    raw = data[tensor.offset : tensor.offset + tensor.nbytes]
    rows = raw.reshape(-1, tensor.nbytes // int(np.prod(shape[:-1])))
    step = max(1, _CHUNK_VALUES // shape[-1])
    parts: list[dict[str, mx.array]] = []
    for start in range(0, rows.shape[0], step):
        values = mx.array(dequantized(rows[start : start + step], tensor.type))
        if form.bits:
            weight, scales, biases = mx.quantize(values, group_size=GROUP_SIZE, bits=form.bits)
            chunk = {"weight": weight, "scales": scales, "biases": biases}
        else:
            chunk = {"weight": values.astype(form.dtype)}
        mx.eval(chunk)
        parts.append(chunk)
    return {
        kind: mx.concatenate([p[kind] for p in parts]).reshape(*shape[:-1], -1)
        for kind in parts[0]
    }


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
