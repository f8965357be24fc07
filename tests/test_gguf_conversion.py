"""Synthetic GGUF files in every supported tensor type and architecture, converted and run
by mlx-lm, against the same files dequantized to float32 by `gguf`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf_synth import HEAD_DIM, float_reference, smollm_tokenizer_metadata, write_tiny_gguf

from models import resolve_model
from models.gguf_arch import ARCHITECTURES, model_config
from models.gguf_file import read_header
from models.gguf_tensors import EXACT_TYPES, GROUP_SIZE, QUANTIZED_BITS, SUPPORTED_TYPES, dequantized

TEXT = "The quick brown fox jumps over the lazy dog, 12345 times!"
# One tensor type per architecture, so each family also meets a different quantization.
ARCH_TYPES = {
    "llama": QType.Q4_K, "mistral": QType.Q6_K, "qwen2": QType.Q5_0, "qwen3": QType.Q8_0,
    "qwen3moe": QType.Q4_K, "gemma2": QType.Q5_K, "gemma3": QType.Q4_K, "phi3": QType.Q3_K,
}


@pytest.fixture(scope="module")
def tokenizer_metadata() -> dict:
    return smollm_tokenizer_metadata(vocab=1024)


def relative_error(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.sqrt(mx.mean((a - b) ** 2)) / mx.sqrt(mx.mean(b**2))).item()


def logits(path: Path) -> mx.array:
    model, tokenizer = mlx_lm.load(str(path))
    return model(mx.array(tokenizer.encode(TEXT))[None])


def convert_and_compare(tmp_path: Path, arch: str, kind: QType, metadata: dict, quant=None) -> tuple[Path, float]:
    """Convert a tiny `arch` file in `kind`; the relative logit error against the
    dequantized reference carrying the same MLX re-quantization."""
    source = write_tiny_gguf(tmp_path / f"{arch}-{kind.name}.gguf", arch, kind, metadata)
    converted = Path(resolve_model(str(source), tmp_path / "cache", quant))
    reference = float_reference(source, converted, tmp_path / "reference", requantized=True)
    return converted, relative_error(logits(converted), logits(reference))


@pytest.mark.parametrize("kind", sorted(EXACT_TYPES), ids=lambda k: k.name)
def test_affine_types_convert_without_loss(tmp_path: Path, tokenizer_metadata: dict, kind: QType) -> None:
    source = write_tiny_gguf(tmp_path / f"{kind.name}.gguf", "qwen3", kind, tokenizer_metadata)
    converted = Path(resolve_model(str(source), tmp_path / "cache"))
    weights = mx.load(str(converted / "model.safetensors"))
    bits = QUANTIZED_BITS[kind]
    header = read_header(source)
    data = np.memmap(source, dtype=np.uint8, mode="r")
    tensor = next(t for t in header.tensors if t.name == "blk.1.ffn_down.weight")
    rows = data[tensor.offset : tensor.offset + tensor.nbytes].reshape(tensor.shape[1], -1)
    name = "model.layers.1.mlp.down_proj"
    mlx_values = mx.dequantize(weights[f"{name}.weight"], weights[f"{name}.scales"], weights[f"{name}.biases"],
                               group_size=GROUP_SIZE, bits=bits)
    assert np.abs(np.array(mlx_values) - dequantized(rows, kind)).max() <= 1e-6 * np.abs(dequantized(rows, kind)).max()


@pytest.mark.parametrize("kind", SUPPORTED_TYPES, ids=lambda k: k.name)
def test_every_tensor_type(tmp_path: Path, tokenizer_metadata: dict, kind: QType) -> None:
    converted, error = convert_and_compare(tmp_path, "llama", kind, tokenizer_metadata)
    config = json.loads((converted / "config.json").read_text())
    if kind in QUANTIZED_BITS:
        assert config["quantization"]["bits"] == QUANTIZED_BITS[kind]
    else:
        assert "quantization" not in config
    assert error < 1e-3


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=str)
def test_every_architecture(tmp_path: Path, tokenizer_metadata: dict, arch: str) -> None:
    converted, error = convert_and_compare(tmp_path, arch, ARCH_TYPES[arch], tokenizer_metadata)
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == ARCHITECTURES[arch].model_type
    assert error < 1e-3


@pytest.mark.parametrize("quant", ["4", "6", "8", "float16"])
def test_gguf_quant_forces_the_form(tmp_path: Path, tokenizer_metadata: dict, quant: str) -> None:
    converted, error = convert_and_compare(tmp_path, "llama", QType.Q5_K, tokenizer_metadata, quant)
    config = json.loads((converted / "config.json").read_text())
    assert converted.name.endswith("-float16" if quant == "float16" else f"-q{quant}")
    if quant == "float16":
        assert "quantization" not in config
        assert mx.load(str(converted / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].dtype == mx.float16
    else:
        assert config["quantization"]["bits"] == int(quant)
    assert error < 2e-3  # float16 weights against float32 ones


def test_the_quantized_layers_keep_float32_scales(tmp_path: Path, tokenizer_metadata: dict) -> None:
    source = write_tiny_gguf(tmp_path / "q4k.gguf", "gemma3", QType.Q4_K, tokenizer_metadata)
    weights = mx.load(str(Path(resolve_model(str(source), tmp_path / "cache")) / "model.safetensors"))
    scales = {k: v.dtype for k, v in weights.items() if k.endswith((".scales", ".biases", "norm.weight"))}
    assert scales and set(scales.values()) == {mx.float32}


def test_a_wrong_convention_is_caught(tmp_path: Path, tokenizer_metadata: dict) -> None:
    """The reference is sensitive to what the conversion is tested for: the same file
    read without undoing llama.cpp's Q/K row order gives very different logits."""
    source = write_tiny_gguf(tmp_path / "llama.gguf", "llama", QType.F32, tokenizer_metadata)
    converted = Path(resolve_model(str(source), tmp_path / "cache"))
    weights = mx.load(str(converted / "model.safetensors"))
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    half = q.shape[0] // 8  # one head's rotary half
    weights["model.layers.0.self_attn.q_proj.weight"] = mx.concatenate([q[half:], q[:half]])
    mx.save_safetensors(str(converted / "model.safetensors"), weights)
    reference = float_reference(source, converted, tmp_path / "reference")
    assert relative_error(logits(converted), logits(reference)) > 1e-2


def llama31_rope_factors(factor: float, head_dim: int, base: float) -> np.ndarray:
    """rope_freqs as llama.cpp's convert_hf_to_gguf.py writes them for Llama 3.1."""
    low, high, old_context = 1.0, 4.0, 8192
    factors = []
    for freq in 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors)


def test_llama3_rope_freqs_become_llama3_rope_scaling(tmp_path: Path, tokenizer_metadata: dict) -> None:
    metadata = tokenizer_metadata | {"tokenizer.ggml.pre": "llama-bpe"}
    factors = llama31_rope_factors(32.0, HEAD_DIM, 500000.0)
    source = write_tiny_gguf(tmp_path / "llama32.gguf", "llama", QType.Q4_K, metadata, rope_factors=factors)
    data = bytearray(source.read_bytes())  # rope base 500000 as in Llama 3
    key = b"llama.rope.freq_base"
    at = data.index(key) + len(key) + 4
    data[at : at + 4] = np.float32(500000.0).tobytes()
    source.write_bytes(data)
    converted = Path(resolve_model(str(source), tmp_path / "cache"))
    config = json.loads((converted / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    reference = float_reference(source, converted, tmp_path / "reference", requantized=True)
    assert relative_error(logits(converted), logits(reference)) < 1e-3


def test_other_rope_freqs_are_refused(tmp_path: Path, tokenizer_metadata: dict) -> None:
    factors = np.linspace(1.0, 4.0, HEAD_DIM // 2)
    source = write_tiny_gguf(tmp_path / "odd.gguf", "llama", QType.Q8_0, tokenizer_metadata, rope_factors=factors)
    with pytest.raises(ValueError, match="unsupported GGUF tensor 'rope_freqs.weight'"):
        resolve_model(str(source), tmp_path / "cache")


def test_conversion_reports_progress(tmp_path: Path, tokenizer_metadata: dict, monkeypatch, caplog) -> None:
    monkeypatch.setattr("models.convert.PROGRESS_EVERY", 0.0)  # a line after every tensor
    source = write_tiny_gguf(tmp_path / "q6.gguf", "qwen3", QType.Q6_K, tokenizer_metadata)
    with caplog.at_level(logging.INFO, logger="models"):
        resolve_model(str(source), tmp_path / "cache")
    shares = [int(m.split(": ")[1].split("%")[0]) for m in caplog.messages if m.startswith("converting q6.gguf: ")]
    assert len(shares) > 10 and shares == sorted(shares) and shares[-1] == 100
    count = len(read_header(source).tensors)
    assert any(m.startswith(f"converted {count} GGUF tensors") for m in caplog.messages)


@pytest.mark.parametrize(("arch", "layers", "scalar"), [("gemma2", 46, 144), ("gemma2", 42, 256), ("gemma3", 62, 168)])
def test_gemma_query_scale(arch: str, layers: int, scalar: int) -> None:
    """Gemma 2 27B (46 layers, 4608 wide, 32 heads of 128) and Gemma 3 27B (62 layers,
    5376 wide) scale queries by width / heads; the others by head size."""
    width = {"gemma2": 4608 if layers == 46 else 3584, "gemma3": 5376}[arch]
    meta = {f"{arch}.{k}": v for k, v in {
        "embedding_length": width, "block_count": layers, "attention.head_count": 32 if layers != 42 else 16,
        "attention.key_length": 128 if layers != 42 else 256, "attention.layer_norm_rms_epsilon": 1e-6,
        "context_length": 8192}.items()} | {"tokenizer.ggml.tokens": ["a"]}
    assert model_config(arch, ARCHITECTURES[arch], meta, set(), None)["query_pre_attn_scalar"] == scalar


def test_end_of_turn_tokens_end_generation_too(tmp_path: Path, tokenizer_metadata: dict) -> None:
    metadata = tokenizer_metadata | {"tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.eot_token_id": 2}
    source = write_tiny_gguf(tmp_path / "eot.gguf", "llama", QType.Q8_0, metadata)
    _, tokenizer = mlx_lm.load(resolve_model(str(source), tmp_path / "cache"))
    assert set(tokenizer.eos_token_ids) == {0, 2}
