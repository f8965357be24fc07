"""Convert a llama GGUF file into an mlx-lm model directory, keeping its quantization."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
from gguf import GGMLQuantizationType as QType

from models.gguf_file import GGUFHeader, read_header
from models.tokenizer import write_tokenizer

log = logging.getLogger(__name__)

# Bits of the block quantizations `mx.load` returns as MLX affine triples; None = dense.
SUPPORTED_TYPES: dict[QType, int | None] = {
    QType.F32: None,
    QType.F16: None,
    QType.Q4_0: 4,
    QType.Q4_1: 4,
    QType.Q8_0: 8,
}
GROUP_SIZE = 32  # weights per block in every supported GGUF quantization

_GLOBAL_MODULES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_MODULES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def convert_gguf(src: Path, dst: Path) -> None:
    """Write config.json, model.safetensors and tokenizer files for `src` into `dst`."""
    header = read_header(src)
    check_supported(header)
    config = model_config(header)
    weights = convert_weights(src, header, config)
    log.info("read %d GGUF tensors from %s", len(header.tensors), src.name)
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(header.metadata, config["max_position_embeddings"], dst)


def check_supported(header: GGUFHeader) -> None:
    """ValueError naming the architecture, tensor or tensor type this converter cannot handle."""
    arch = header.metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} (only 'llama')")
    scaling = header.metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"unsupported rope scaling {scaling!r}")
    for tensor in header.tensors:
        if tensor.type not in SUPPORTED_TYPES:
            raise ValueError(
                f"unsupported GGUF tensor type {tensor.type.name} (tensor {tensor.name!r}); "
                f"supported: {', '.join(t.name for t in SUPPORTED_TYPES)}"
            )
        module_name(tensor.name)


def module_name(tensor_name: str) -> str:
    """mlx-lm module of a GGUF tensor: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj."""
    base, _, suffix = tensor_name.rpartition(".")
    parts = base.split(".")
    if suffix == "weight" and base in _GLOBAL_MODULES:
        return _GLOBAL_MODULES[base]
    if suffix == "weight" and len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_MODULES:
        return f"model.layers.{parts[1]}.{_LAYER_MODULES[parts[2]]}"
    raise ValueError(f"unsupported GGUF tensor {tensor_name!r}")


def model_config(header: GGUFHeader) -> dict[str, Any]:
    """config.json for mlx-lm's llama model, with its `quantization` entry."""
    meta = header.metadata
    hidden = _require(meta, "llama.embedding_length")
    heads = _require(meta, "llama.attention.head_count")
    names = {t.name for t in header.tensors}
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": _require(meta, "llama.block_count"),
        "intermediate_size": _require(meta, "llama.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "head_dim": meta.get("llama.attention.key_length", hidden // heads),
        # GGUF stores float32; the shortest repr keeps config.json readable (1e-05).
        "rms_norm_eps": float(f"{_require(meta, 'llama.attention.layer_norm_rms_epsilon'):.7g}"),
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": _require(meta, "llama.context_length"),
        "vocab_size": len(_require(meta, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    quantization = quantization_config(header)
    if quantization:
        config["quantization"] = quantization
    return config


def quantization_config(header: GGUFHeader) -> dict[str, Any] | None:
    """Most common bit width as default, a per-module entry wherever a tensor differs."""
    bits = {
        module_name(t.name): SUPPORTED_TYPES[t.type]
        for t in header.tensors
        if SUPPORTED_TYPES[t.type] is not None
    }
    if not bits:
        return None
    default = Counter(bits.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default}
    for module, module_bits in bits.items():
        if module_bits != default:
            config[module] = {"group_size": GROUP_SIZE, "bits": module_bits}
    return config


def convert_weights(src: Path, header: GGUFHeader, config: dict[str, Any]) -> dict[str, mx.array]:
    """mlx-lm weights: renamed, Q/K rows in HF order, scales/biases and norms float32."""
    try:
        raw = mx.load(str(src))
    except RuntimeError as err:
        raise ValueError(f"{src}: cannot read GGUF tensors: {err}") from err
    heads = {
        "attn_q": config["num_attention_heads"],
        "attn_k": config["num_key_value_heads"],
    }
    weights = {}
    for tensor in header.tensors:
        base = tensor.name.removesuffix(".weight")
        module = module_name(tensor.name)
        parts = {"weight": raw.pop(tensor.name)}
        if SUPPORTED_TYPES[tensor.type] is not None:
            # float16 scales made CPU decoding ~30x slower; float32 costs little memory.
            parts["scales"] = raw.pop(f"{base}.scales").astype(mx.float32)
            parts["biases"] = raw.pop(f"{base}.biases").astype(mx.float32)
        elif len(tensor.shape) == 1:
            parts["weight"] = parts["weight"].astype(mx.float32)
        n_heads = heads.get(base.rpartition(".")[2])
        for kind, array in parts.items():
            weights[f"{module}.{kind}"] = unpermute_rows(array, n_heads) if n_heads else array
    return weights


def unpermute_rows(array: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (`permute` in convert_hf_to_gguf.py).

    llama.cpp interleaves the two rotary halves of each head, row pairs (0, d/2), (1, d/2+1)...
    for its rope layout; mlx-lm's non-traditional rope expects HF's split halves. Rows are
    independent in the quantized triples too, so the same reordering applies to all three.
    """
    rows = array.shape[0]
    split = array.reshape(n_heads, rows // n_heads // 2, 2, *array.shape[1:])
    return split.swapaxes(1, 2).reshape(array.shape)


def _require(metadata: dict[str, Any], key: str) -> Any:
    if key not in metadata:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return metadata[key]
