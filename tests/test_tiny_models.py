"""The tiny random models load with mlx-lm, generate varied text, and are reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import mlx_lm
import pytest
from mlx.utils import tree_flatten

from models.tiny import ARCHITECTURES, make_tiny_model

PROMPT = "Tell me about the harbour town of Wexley and its school of 212 pupils."


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All architectures generated once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    for arch in ARCHITECTURES:
        make_tiny_model(arch, root / arch)
    return root


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loads_strict_and_generates_varied_tokens(model_root: Path, arch: str) -> None:
    model, tokenizer = mlx_lm.load(str(model_root / arch))  # strict by default
    messages = [{"role": "user", "content": PROMPT}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # Longer than gemma3_text's sliding window, so both attention kinds run.
    assert len(prompt) > 16
    tokens = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=10)]
    assert len(tokens) == 10, "stopped at EOS early"
    assert len(set(tokens)) > 1, f"{arch} repeats one token: {tokens}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_index_maps_every_parameter_across_shards(model_root: Path, arch: str) -> None:
    path = model_root / arch
    model, _ = mlx_lm.load(str(path))
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == {name for name, _ in tree_flatten(model.parameters())}
    assert len(set(weight_map.values())) >= 2
    # Layers are split by number: layer 0 and the last layer live in different files.
    assert weight_map["model.layers.0.input_layernorm.weight"] != weight_map["model.layers.5.input_layernorm.weight"]
    for file in set(weight_map.values()):
        assert (path / file).is_file()


def test_tokenizer_chat_template_and_round_trip(model_root: Path) -> None:
    _, tokenizer = mlx_lm.load(str(model_root / "llama"))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    sample = "The 3 boats left at 10:45, didn't they? Yes: (all of them)!"
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    assert tokenizer.eos_token == "<|im_end|>"


def test_same_seed_gives_identical_files(model_root: Path, tmp_path: Path) -> None:
    again = make_tiny_model("qwen3", tmp_path / "qwen3")
    for file in sorted((model_root / "qwen3").iterdir()):
        assert (again / file.name).read_bytes() == file.read_bytes(), file.name
    other = make_tiny_model("qwen3", tmp_path / "seed1", seed=1)
    assert (other / "model-00001-of-00002.safetensors").read_bytes() != (again / "model-00001-of-00002.safetensors").read_bytes()
