"""Tiny GGUF files as llama.cpp writes them, and their float32 reference as an mlx-lm model.

The files hold random weights in a chosen tensor type and SmolLM2's real tokenizer
metadata; the reference is the same file dequantized by the `gguf` package. It borrows
the converter's name map and conventions (Q/K row order, Gemma's norms), which the real
models check (SmolLM2 for llama, Gemma 3); against it the synthetic files check the
tensor data path: dequantization, codes and scales, packing, re-quantization, shapes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType, GGUFWriter
from gguf import GGMLQuantizationType as QType
from gguf import quants

from models.convert import unpermute_rows
from models.gguf_arch import ARCHITECTURES, ROPE_FREQS
from models.gguf_file import read_header
from models.gguf_tensors import EXACT_TYPES, QUANTIZED_BITS, dequantized
from models.source import default_gguf

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FF = 256, 4, 2, 64, 512
# mlx-lm's Gemma 3 finds its first global-attention layer at index 5.
LAYERS = {"gemma3": 6}
EXPERTS, EXPERTS_USED, EXPERT_FF = 4, 2, 256
# Digits, punctuation, CJK and emoji: every tokenizer must give these back exactly.
ROUND_TRIP_TEXTS = [
    "Prix: 1 234,56 € — naïve café (x+y)^2! «quoted» … 3.14159",
    "東京タワーは1958年に完成しました。你好，世界！",
    "emoji 🙂👍🏽 and 👨‍👩‍👧 family\ttab\nnew line   spaces",
    "2024-12-02T16:38:06Z, 0xDEADBEEF, ID=000123456789",
]
# Where each type without a `gguf` quantizer keeps its float scales in a block:
# (byte offset, numpy dtype, size); every other byte is random codes.
_SCALE_FIELDS = {
    QType.Q2_K: [(80, np.float16, 2e-3), (82, np.float16, 1e-3)],
    QType.Q3_K: [(108, np.float16, 1e-3)],
    QType.Q4_K: [(0, np.float16, 2e-4), (2, np.float16, 2e-4)],
    QType.Q5_K: [(0, np.float16, 1e-4), (2, np.float16, 1e-4)],
    QType.Q6_K: [(208, np.float16, 5e-5)],
    QType.Q8_K: [(0, np.float32, 1e-3)],
    QType.IQ4_NL: [(0, np.float16, 1e-3)],
    QType.IQ4_XS: [(0, np.float16, 1e-3)],
}


def smollm_tokenizer_metadata(vocab: int = 4096) -> dict:
    """The `tokenizer.*` metadata of the default model's GGUF (a real byte-level BPE), cut
    to its first `vocab` tokens and the merges among them: a BPE vocabulary lists bytes
    and special tokens first, then merge results in merge order, so the cut still
    tokenizes any text, in more pieces, and keeps the embedding matrices small."""
    meta = read_header(default_gguf()).metadata
    tokenizer = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    kept = set(tokenizer["tokenizer.ggml.tokens"][:vocab])
    tokenizer["tokenizer.ggml.tokens"] = tokenizer["tokenizer.ggml.tokens"][:vocab]
    tokenizer["tokenizer.ggml.token_type"] = tokenizer["tokenizer.ggml.token_type"][:vocab]
    tokenizer["tokenizer.ggml.merges"] = [
        m for m in tokenizer["tokenizer.ggml.merges"] if {*m.split(" "), m.replace(" ", "")} <= kept
    ]
    return tokenizer


def tensor_bytes(values: np.ndarray, kind: QType, rng: np.random.Generator) -> np.ndarray:
    """`values` (float32 rows) in GGUF type `kind`: quantized by `gguf` where it can;
    otherwise random codes under small scales (the values are then not `values`)."""
    if kind == QType.F32:
        return values
    if kind == QType.F16:
        return values.astype(np.float16)
    if kind not in _SCALE_FIELDS:
        return quants.quantize(values, kind)
    block, block_bytes = GGML_QUANT_SIZES[kind]
    rows = values.reshape(-1, values.shape[-1])
    raw = rng.integers(0, 256, (rows.shape[0], rows.shape[1] // block, block_bytes), dtype=np.uint8)
    for offset, dtype, scale in _SCALE_FIELDS[kind]:
        size = np.dtype(dtype).itemsize
        field = (rng.uniform(0.5, 1.5, raw.shape[:2]) * scale).astype(dtype)
        raw[:, :, offset : offset + size] = field[..., None].view(np.uint8)
    return raw.reshape(*values.shape[:-1], -1)


def _metadata(writer: GGUFWriter, arch: str, vocab: int) -> None:
    put = {"context_length": 2048, "embedding_length": HIDDEN, "block_count": LAYERS.get(arch, 2),
           "feed_forward_length": FF, "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS,
           "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0,
           "rope.dimension_count": HEAD_DIM, "attention.key_length": HEAD_DIM,
           "attention.value_length": HEAD_DIM}
    if arch == "qwen3moe":
        put |= {"expert_count": EXPERTS, "expert_used_count": EXPERTS_USED, "expert_feed_forward_length": EXPERT_FF}
    if arch == "gemma2":
        put |= {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    if arch == "gemma3":
        put |= {"attention.sliding_window": 512}
    for key, value in put.items():
        full = f"{arch}.{key}"
        if isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_uint32(full, value)
    writer.add_uint32(f"{arch}.vocab_size", vocab)


def _tensor_shapes(arch: str, vocab: int) -> dict[str, tuple[int, ...]]:
    """numpy shapes (outermost first) of every tensor the architecture's GGUF holds."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not arch.startswith("gemma"):
        shapes["output.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS.get(arch, 2)):
        layer = {"attn_norm": (HIDDEN,), "ffn_norm": (HIDDEN,), "attn_output": (HIDDEN, q)}
        if arch == "phi3":
            layer |= {"attn_qkv": (q + 2 * kv, HIDDEN), "ffn_up": (2 * FF, HIDDEN), "ffn_down": (HIDDEN, FF)}
        else:
            layer |= {"attn_q": (q, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN)}
        if arch == "qwen3moe":
            layer |= {"ffn_gate_inp": (EXPERTS, HIDDEN), "ffn_gate_exps": (EXPERTS, EXPERT_FF, HIDDEN),
                      "ffn_up_exps": (EXPERTS, EXPERT_FF, HIDDEN), "ffn_down_exps": (EXPERTS, HIDDEN, EXPERT_FF)}
        elif arch != "phi3":
            layer |= {"ffn_gate": (FF, HIDDEN), "ffn_up": (FF, HIDDEN), "ffn_down": (HIDDEN, FF)}
        if arch in ("qwen3", "qwen3moe", "gemma3"):
            layer |= {"attn_q_norm": (HEAD_DIM,), "attn_k_norm": (HEAD_DIM,)}
        if arch.startswith("gemma"):
            layer |= {"post_attention_norm": (HIDDEN,), "post_ffw_norm": (HIDDEN,)}
        shapes |= {f"blk.{i}.{name}.weight": shape for name, shape in layer.items()}
        if arch == "qwen2":
            shapes |= {f"blk.{i}.attn_{p}.bias": (n,) for p, n in (("q", q), ("k", kv), ("v", kv))}
    return shapes


def write_tiny_gguf(
    path: Path, arch: str, kind: QType, tokenizer: dict, seed: int = 0, rope_factors: np.ndarray | None = None
) -> Path:
    """A tiny `arch` model with every matrix in `kind` (vectors and the router float32);
    `rope_factors`: a Llama 3.1-style rope_freqs tensor."""
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer["tokenizer.ggml.tokens"])
    writer = GGUFWriter(str(path), arch)
    _metadata(writer, arch, vocab)
    for key, value in tokenizer.items():
        writer.add_key_value(key, value, _value_type(value))
    for name, shape in _tensor_shapes(arch, vocab).items():
        if len(shape) == 1:
            center = 1.0 if name.endswith("norm.weight") else 0.0
            writer.add_tensor(name, (center + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        values = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        matrix_kind = QType.F32 if "ffn_gate_inp" in name else kind
        data = tensor_bytes(values, matrix_kind, rng)
        writer.add_tensor(name, data, raw_dtype=matrix_kind if data.dtype == np.uint8 else None)
    if rope_factors is not None:
        writer.add_tensor(ROPE_FREQS, rope_factors.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _value_type(value) -> GGUFValueType:
    if isinstance(value, list):
        return GGUFValueType.ARRAY
    return GGUFValueType.get_type(value)


def float_reference(gguf_path: Path, converted: Path, out: Path, requantized: bool = False) -> Path:
    """`gguf_path` dequantized to float32 by `gguf`, as an mlx-lm model beside `converted`
    (whose config, without its quantization, and tokenizer it shares). `requantized`:
    each matrix `converted` re-quantized (quantized, at bits other than an affine
    source's own) goes through MLX's quantize and dequantize first, so the reference
    carries exactly the re-quantization error."""
    out.mkdir(parents=True, exist_ok=True)
    header = read_header(gguf_path)
    arch = ARCHITECTURES[header.metadata["general.architecture"]]
    config = json.loads((converted / "config.json").read_text())
    quantization = config.pop("quantization", None) or {}
    converted_names = set(mx.load(str(converted / "model.safetensors")))
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    data = np.memmap(gguf_path, dtype=np.uint8, mode="r")
    weights = {}
    for tensor in (t for t in header.tensors if t.name != ROPE_FREQS):
        shape = tuple(reversed(tensor.shape))
        rows = data[tensor.offset : tensor.offset + tensor.nbytes].reshape(int(np.prod(shape[:-1])), -1)
        array = mx.array(dequantized(rows, tensor.type).reshape(shape))
        module = arch.module_name(tensor.name).rpartition(".")[0]
        form = quantization.get(module) or quantization
        kept = tensor.type in EXACT_TYPES and form.get("bits") == QUANTIZED_BITS[tensor.type]
        if requantized and tensor.name.endswith(".weight") and f"{module}.scales" in converted_names and not kept:
            packed = mx.quantize(array, group_size=form["group_size"], bits=form["bits"])
            array = mx.dequantize(*packed, group_size=form["group_size"], bits=form["bits"])
        layer_kind = tensor.name.split(".")[-2]
        if arch.permuted_qk and layer_kind in heads:
            array = unpermute_rows(array, heads[layer_kind])
        if arch.norms_plus_one and layer_kind.endswith("norm"):
            array = array - 1.0
        weights[arch.module_name(tensor.name)] = array
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(converted / name, out / name)
    return out
