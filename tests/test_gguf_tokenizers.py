"""Tokenizers built from GGUF metadata: each llama.cpp pre-tokenizer on a real byte-level
vocabulary (SmolLM2's), exact round trips, and the chat template carried over."""

from __future__ import annotations

from pathlib import Path

import mlx_lm
import pytest
from gguf import GGMLQuantizationType as QType
from gguf_synth import ROUND_TRIP_TEXTS, smollm_tokenizer_metadata, write_tiny_gguf

from models import resolve_model
from models.tokenizer import build_tokenizer, check_tokenizer

# How each pre-tokenizer cuts a run of digits (llama.cpp's regexes).
DIGIT_SPLITS = {
    "default": ["Ġ12345"],
    "gpt2": ["Ġ12345"],
    "smollm": ["Ġ", "1", "2", "3", "4", "5"],
    "llama-bpe": ["Ġ", "123", "45"],
    "qwen2": ["Ġ", "1", "2", "3", "4", "5"],
    "tekken": ["Ġ", "1", "2", "3", "4", "5"],
}


@pytest.fixture(scope="module")
def smollm_metadata() -> dict:
    return {"general.architecture": "llama"} | smollm_tokenizer_metadata(vocab=49152)


@pytest.mark.parametrize("pre", DIGIT_SPLITS)
def test_pre_tokenizer_round_trips(smollm_metadata: dict, pre: str) -> None:
    tokenizer = build_tokenizer(smollm_metadata | {"tokenizer.ggml.pre": pre})
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
        assert tokenizer.token_to_id("<|endoftext|>") not in ids
    pieces = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(" 12345")]
    assert pieces == DIGIT_SPLITS[pre]


def test_special_tokens_stay_whole(smollm_metadata: dict) -> None:
    tokenizer = build_tokenizer(smollm_metadata | {"tokenizer.ggml.pre": "llama-bpe"})
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == tokenizer.token_to_id("<|im_start|>")
    assert ids[-1] == tokenizer.token_to_id("<|im_end|>")


def test_unknown_pre_tokenizer_is_refused(smollm_metadata: dict) -> None:
    with pytest.raises(ValueError, match=r"unsupported GGUF pre-tokenizer 'made-up'; supported: .*llama-bpe"):
        check_tokenizer(smollm_metadata | {"tokenizer.ggml.pre": "made-up"})


def test_chat_template_comes_from_the_metadata(tmp_path: Path) -> None:
    metadata = smollm_tokenizer_metadata() | {"tokenizer.ggml.pre": "qwen2"}
    source = write_tiny_gguf(tmp_path / "qwen2.gguf", "qwen2", QType.Q8_0, metadata)
    _, tokenizer = mlx_lm.load(resolve_model(str(source), tmp_path / "cache"))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi 東京 🙂"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi 東京 🙂<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer.encode(text)) == text
