"""Convert a GGUF file into an mlx-lm model directory, quantized as close to the file as MLX allows."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from models.gguf_arch import ROPE_FREQS, Architecture, architecture, model_config
from models.gguf_file import GGUFHeader, TensorInfo, read_header
from models.gguf_tensors import SUPPORTED_TYPES, Target, read_tensor, target
from models.tokenizer import build_tokenizer, check_tokenizer, write_tokenizer

log = logging.getLogger(__name__)

PROGRESS_EVERY = 10.0  # seconds between progress lines


def check_gguf(src: Path) -> GGUFHeader:
    """The file's header; ValueError naming what makes the file unusable (damage, an
    architecture, a tensor type or name, a tokenizer) and what is supported."""
    header = read_header(src)
    check_supported(header)
    check_tokenizer(header.metadata)
    return header


def convert_gguf(src: Path, header: GGUFHeader, dst: Path, forced: Optional[str] = None) -> None:
    """Write config.json, model.safetensors and tokenizer files for `src` (its header
    checked by `check_gguf`) into `dst`.

    `forced` (GGUF_QUANT: "4", "6", "8" or "float16") overrides the per-tensor choice.
    """
    name, arch = architecture(header.metadata)
    tokenizer = build_tokenizer(header.metadata)
    data = np.memmap(src, dtype=np.uint8, mode="r")
    tensors = [t for t in header.tensors if t.name != ROPE_FREQS]
    rope = next((t for t in header.tensors if t.name == ROPE_FREQS), None)
    rope_factors = np.array(read_tensor(data, rope, Target())["weight"]) if rope else None
    forms = {t.name: target(t, forced) for t in tensors}
    config = model_config(name, arch, header.metadata, set(forms), rope_factors)
    quantization = quantization_config(arch, forms)
    if quantization:
        config["quantization"] = quantization
    weights = convert_weights(src.name, data, tensors, arch, config, forms)
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(tokenizer, header.metadata, config["max_position_embeddings"], dst)


def check_supported(header: GGUFHeader) -> None:
    """ValueError naming the architecture, tensor or tensor type this converter cannot handle."""
    name, arch = architecture(header.metadata)
    for tensor in header.tensors:
        if tensor.type not in SUPPORTED_TYPES:
            raise ValueError(
                f"unsupported GGUF tensor type {tensor.type.name} (tensor {tensor.name!r}); "
                f"supported: {', '.join(t.name for t in SUPPORTED_TYPES)}"
            )
        if not (tensor.name == ROPE_FREQS and name == "llama"):
            arch.module_name(tensor.name)


def quantization_config(arch: Architecture, forms: dict[str, Target]) -> Optional[dict[str, Any]]:
    """Most common bit width as default, a per-module entry wherever a tensor differs
    (False for a quantizable module kept dense)."""
    modules = {
        arch.module_name(name).rpartition(".")[0]: form.quantization()
        for name, form in forms.items()
        if name.endswith(".weight") and (form.bits or form.dtype != mx.float32)
    }
    chosen = [q for q in modules.values() if q]
    if not chosen:
        return None
    default = Counter(q["bits"] for q in chosen).most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": chosen[0]["group_size"], "bits": default}
    for module, quant in modules.items():
        if quant is None or quant["bits"] != default:
            config[module] = quant or False
    return config


def convert_weights(
    file_name: str, data: np.ndarray, tensors: list[TensorInfo], arch: Architecture, config: dict[str, Any],
    forms: dict[str, Target],
) -> dict[str, mx.array]:
    """mlx-lm weights: renamed, Q/K rows in HF order, Gemma norms without llama.cpp's + 1."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    total = sum(t.nbytes for t in tensors)
    done, last_report, start = 0, time.monotonic(), time.monotonic()
    weights = {}
    for tensor in tensors:
        parameter = arch.module_name(tensor.name)
        parts = read_tensor(data, tensor, forms[tensor.name])
        layer_kind = tensor.name.split(".")[-2]
        if arch.permuted_qk and layer_kind in heads:
            parts = {kind: unpermute_rows(array, heads[layer_kind]) for kind, array in parts.items()}
        if arch.norms_plus_one and layer_kind.endswith("norm"):
            parts["weight"] = parts["weight"] - 1.0
        module, _, suffix = parameter.rpartition(".")
        if suffix == "bias":
            weights[parameter] = parts["weight"]
        else:
            weights |= {f"{module}.{kind}": array for kind, array in parts.items()}
        done += tensor.nbytes
        if time.monotonic() - last_report >= PROGRESS_EVERY:
            last_report = time.monotonic()
            log.info("converting %s: %d%% of %.0f MB", file_name, 100 * done // total, total / 2**20)
    log.info("converted %d GGUF tensors (%.0f MB) from %s in %.1f s",
             len(tensors), total / 2**20, file_name, time.monotonic() - start)
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
