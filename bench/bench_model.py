"""The benchmarks' models, random weights in float32 with SmolLM2's tokenizer (vocab
49152, ChatML template): `qwen2`, a dense model of about 184M parameters (the throughput
and scaling benchmarks' model), and `deepseek_v2`, a mixture of experts with latent
attention shaped like a small DeepSeek-Coder-V2-Lite (first layer dense, 32 routed
experts of which 4 run per token, 2 shared).

Built with models/tiny.py's generator at benchmark sizes, written once and
reused: the directory is complete only once config.json is in it.

    .venv/bin/python -m bench.bench_model [FAMILY] [OUT_DIR]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from models.tiny import _write_json, _write_weights, model_config, random_weights


CACHE = Path.home() / ".cache" / "mlx-ring" / "bench"
DEFAULT_DIR = CACHE / "qwen2-184m"

# Per family: the number of layers and the config sizes over models/tiny.py's.
FAMILIES: dict[str, tuple[int, dict]] = {
    # Qwen2-style shapes; with SmolLM2's 49152-token vocab (tied head) about 182.5M parameters.
    "qwen2": (12, {
        "hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 2,
        "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
    }),
    # The shared tiny configs' deepseek_v2 (4 layers, the first dense) at DeepSeek-V2-Lite's
    # proportions: about 370M parameters, about 80M of them read per token.
    "deepseek_v2": (4, {
        "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 704, "num_attention_heads": 16,
        "num_key_value_heads": 16, "n_routed_experts": 32, "num_experts_per_tok": 4, "n_shared_experts": 2,
        "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
        "vocab_size": 49152, "max_position_embeddings": 8192,
    }),
}

# The tokenizer files copied from the converted default model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def bench_config(family: str) -> dict:
    """config.json: the tiny config at benchmark sizes, SmolLM2's special token ids."""
    layers, sizes = FAMILIES[family]
    return model_config(family, layers, **sizes) | {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def default_model_dir() -> Path:
    """The converted default model (SmolLM2), whose tokenizer the bench model uses."""
    from config import load_settings
    from models import resolve_model

    return Path(resolve_model(None, load_settings().model_cache_dir))


def make_bench_model(out_dir: Path = DEFAULT_DIR, family: str = "qwen2") -> Path:
    """The model directory, written first if absent."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".bench-model-", dir=out_dir.parent))
    try:
        config = bench_config(family)
        layers, sizes = FAMILIES[family]
        _write_weights(random_weights(family, num_layers=layers, **sizes), work, layers)
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


def family_model(family: str) -> Path:
    """The bench model of `family`, in the cache."""
    return make_bench_model(DEFAULT_DIR if family == "qwen2" else CACHE / family, family)


if __name__ == "__main__":
    family = sys.argv[1] if len(sys.argv) > 1 else "qwen2"
    path = make_bench_model(Path(sys.argv[2]), family) if len(sys.argv) > 2 else family_model(family)
    print(f"{path}: {parameter_count(path) / 1e6:.1f}M parameters")
