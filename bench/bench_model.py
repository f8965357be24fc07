"""The throughput benchmark's model: a random-weight qwen2 of about 184M parameters,
float32, with SmolLM2's tokenizer (vocab 49152, ChatML template).

Built with models/tiny.py's generator at benchmark sizes, written once and
reused: the directory is complete only once config.json is in it.

    .venv/bin/python -m bench.bench_model [OUT_DIR]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from models.tiny import _write_json, _write_weights, model_config, random_weights


DEFAULT_DIR = Path.home() / ".cache" / "mlx-ring" / "bench" / "qwen2-184m"
NUM_LAYERS = 12

# Qwen2-style shapes; with SmolLM2's 49152-token vocab (tied head) about 182.5M parameters.
SIZES = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
}

# The tokenizer files copied from the converted default model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def bench_config() -> dict:
    """config.json: the tiny qwen2 config at benchmark sizes, SmolLM2's special token ids."""
    return model_config("qwen2", NUM_LAYERS, **SIZES) | {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def default_model_dir() -> Path:
    """The converted default model (SmolLM2), whose tokenizer the bench model uses."""
    from config import load_settings
    from models import resolve_model

    return Path(resolve_model(None, load_settings().model_cache_dir))


def make_bench_model(out_dir: Path = DEFAULT_DIR) -> Path:
    """The model directory, written first if absent."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".bench-model-", dir=out_dir.parent))
    try:
        config = bench_config()
        _write_weights(random_weights("qwen2", num_layers=NUM_LAYERS, **SIZES), work, NUM_LAYERS)
        tokenizer_dir = default_model_dir()
        for name in TOKENIZER_FILES:
            shutil.copy(tokenizer_dir / name, work / name)
        _write_json(work / "config.json", config)
        shutil.rmtree(out_dir, ignore_errors=True)
        work.rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def parameter_count(model_dir: Path) -> int:
    """Parameters in the model's safetensors files."""
    return sum(v.size for f in sorted(Path(model_dir).glob("*.safetensors")) for v in mx.load(str(f)).values())


if __name__ == "__main__":
    path = make_bench_model(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR)
    print(f"{path}: {parameter_count(path) / 1e6:.1f}M parameters")
