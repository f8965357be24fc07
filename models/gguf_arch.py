"""Per-architecture GGUF conventions: mlx-lm model type, tensor names, config, rope and norms.

llama.cpp's converter changes weights for some families, and mlx-lm expects them as Hugging
Face has them: it interleaves the rotary halves of llama/mistral Q and K rows (undone
here), and stores Gemma's norm weights as 1 + w where mlx-lm's Gemma norms add the 1
themselves (1 is subtracted here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.rope_utils import Llama3RoPE

Metadata = dict[str, Any]
# Llama 3.1+ files: llama.cpp's per-frequency rope factors, a tensor that feeds the config.
ROPE_FREQS = "rope_freqs.weight"

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
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA_NORMS = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_FUSED = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_MOE = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
}


@dataclass(frozen=True)
class Architecture:
    """How one GGUF `general.architecture` maps onto an mlx-lm model."""

    model_type: str
    layer_modules: dict[str, str]
    extra_config: Callable[[str, Metadata], dict[str, Any]] = lambda arch, meta: {}
    permuted_qk: bool = False  # llama.cpp interleaved Q/K rows for its rope layout
    norms_plus_one: bool = False  # llama.cpp stored Gemma's norm weights as 1 + w
    suffixes: tuple[str, ...] = field(default=("weight",))

    def module_name(self, tensor_name: str) -> str:
        """mlx-lm parameter of a GGUF tensor: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
        base, _, suffix = tensor_name.rpartition(".")
        parts = base.split(".")
        if suffix in self.suffixes:
            if base in _GLOBAL_MODULES:
                return f"{_GLOBAL_MODULES[base]}.{suffix}"
            if len(parts) == 3 and parts[0] == "blk" and parts[2] in self.layer_modules:
                return f"model.layers.{parts[1]}.{self.layer_modules[parts[2]]}.{suffix}"
        raise ValueError(f"unsupported GGUF tensor {tensor_name!r} for model type {self.model_type!r}")


# Gemma's 27B models scale queries by hidden size / heads, not head size; the metadata does
# not say so, and llama.cpp, like this, tells the 27B model by its layer count.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_config(arch: str, meta: Metadata) -> dict[str, Any]:
    scalar = meta[f"{arch}.attention.key_length"]
    if meta[f"{arch}.block_count"] == _GEMMA_27B_LAYERS[arch]:
        scalar = meta[f"{arch}.embedding_length"] // meta[f"{arch}.attention.head_count"]
    config: dict[str, Any] = {"query_pre_attn_scalar": scalar}
    if arch == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if f"{arch}.{key}" in meta:
                config[key] = meta[f"{arch}.{key}"]
    else:
        # Not in the metadata: llama.cpp hard-codes Gemma 3's local layers the same way.
        config |= {"sliding_window": meta.get(f"{arch}.attention.sliding_window", 512),
                   "sliding_window_pattern": 6, "rope_local_base_freq": 10000.0}
        if meta.get(f"{arch}.rope.scaling.type") == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": meta[f"{arch}.rope.scaling.factor"]}
    return config


def _phi3_config(arch: str, meta: Metadata) -> dict[str, Any]:
    heads = meta[f"{arch}.attention.head_count"]
    head_dim = meta[f"{arch}.embedding_length"] // heads
    rotary = meta.get(f"{arch}.rope.dimension_count", head_dim)
    return {"partial_rotary_factor": rotary / head_dim,
            "original_max_position_embeddings": meta.get(f"{arch}.context_length")}


def _moe_config(arch: str, meta: Metadata) -> dict[str, Any]:
    expert_ff = meta[f"{arch}.expert_feed_forward_length"]
    return {
        "num_experts": meta[f"{arch}.expert_count"],
        "num_experts_per_tok": meta[f"{arch}.expert_used_count"],
        "moe_intermediate_size": expert_ff,
        "intermediate_size": meta.get(f"{arch}.feed_forward_length", expert_ff),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        # llama.cpp's qwen3moe graph always renormalizes the chosen experts' weights.
        "norm_topk_prob": True,
    }


_LLAMA = Architecture("llama", _LAYER_MODULES, permuted_qk=True)
_GEMMA = dict(norms_plus_one=True, extra_config=_gemma_config)
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    # mlx-lm runs Mistral's dense models as llama (its MODEL_REMAPPING does the same).
    "mistral": _LLAMA,
    "qwen2": Architecture("qwen2", _LAYER_MODULES, suffixes=("weight", "bias")),
    "qwen3": Architecture("qwen3", _LAYER_MODULES | _QK_NORMS),
    "qwen3moe": Architecture("qwen3_moe", _LAYER_MODULES | _QK_NORMS | _MOE, extra_config=_moe_config),
    "gemma2": Architecture("gemma2", _LAYER_MODULES | _GEMMA_NORMS, **_GEMMA),
    "gemma3": Architecture("gemma3_text", _LAYER_MODULES | _GEMMA_NORMS | _QK_NORMS, **_GEMMA),
    "phi3": Architecture("phi3", _LAYER_MODULES | _PHI3_FUSED, extra_config=_phi3_config),
}


def architecture(meta: Metadata) -> tuple[str, Architecture]:
    """The GGUF architecture name and its conventions; ValueError listing the supported ones."""
    name = meta.get("general.architecture")
    if name not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {name!r}; supported: {', '.join(ARCHITECTURES)}")
    scaling = meta.get(f"{name}.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (scaling == "linear" and name != "gemma3"):
        raise ValueError(f"unsupported rope scaling {scaling!r} for GGUF architecture {name!r}")
    return name, ARCHITECTURES[name]


def model_config(
    name: str, arch: Architecture, meta: Metadata, tensor_names: set[str], rope_factors: Optional[np.ndarray]
) -> dict[str, Any]:
    """config.json for the mlx-lm model (without its `quantization` entry); `rope_factors`
    is the file's ROPE_FREQS tensor, if it has one."""
    hidden = _require(meta, f"{name}.embedding_length")
    heads = _require(meta, f"{name}.attention.head_count")
    config: dict[str, Any] = {
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": _require(meta, f"{name}.block_count"),
        "intermediate_size": meta.get(f"{name}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{name}.attention.head_count_kv", heads),
        "head_dim": meta.get(f"{name}.attention.key_length", hidden // heads),
        # GGUF stores float32; the shortest repr keeps config.json readable (1e-05).
        "rms_norm_eps": float(f"{_require(meta, f'{name}.attention.layer_norm_rms_epsilon'):.7g}"),
        "rope_theta": meta.get(f"{name}.rope.freq_base", 10000.0),
        "max_position_embeddings": _require(meta, f"{name}.context_length"),
        "vocab_size": len(_require(meta, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _end_tokens(meta),
    }
    if rope_factors is not None:
        config["rope_scaling"] = llama3_rope_scaling(rope_factors, config["head_dim"], config["rope_theta"])
    return config | arch.extra_config(name, meta)


def _end_tokens(meta: Metadata) -> Optional[int | list[int]]:
    """EOS, and the end-of-turn tokens llama.cpp also stops at (Llama 3's <|eot_id|>, ...)."""
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = list(dict.fromkeys(meta[f"tokenizer.ggml.{k}"] for k in keys if f"tokenizer.ggml.{k}" in meta))
    return ids[0] if len(ids) == 1 else (ids or None)


def llama3_rope_scaling(factors: np.ndarray, head_dim: int, base: float) -> dict[str, Any]:
    """mlx-lm's "llama3" rope scaling that gives the file's per-frequency factors.

    The file keeps only the factors; every Llama 3.1-3.3 model derives them from the
    same low/high frequency factors and original context, with its own overall factor.
    """
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    rope = Llama3RoPE(head_dim, base=base, scaling_config=scaling)
    implied = np.array(rope._freqs / base ** (mx.arange(0, head_dim, 2) / head_dim))
    if implied.shape != factors.shape or not np.allclose(implied, factors, rtol=1e-3):
        raise ValueError(
            f"unsupported GGUF tensor {ROPE_FREQS!r}: its factors are not Llama 3's rope scaling "
            f"(low/high frequency factors 1 and 4, original context 8192, factor {scaling['factor']:g})"
        )
    return scaling


def _require(meta: Metadata, key: str) -> Any:
    if key not in meta:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return meta[key]
