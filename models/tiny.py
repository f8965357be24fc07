"""Tiny random-weight mlx-lm models, for tests and benchmarks.

`make_tiny_model(arch, out_dir)` writes a complete model directory (config,
two safetensors shards plus index, a real byte-level BPE tokenizer with a
ChatML chat template) that `mlx_lm.load` accepts in strict mode. `arch` is one of
ARCHITECTURES (hand-tuned configs, 6 layers) or any other mlx-lm model type the
shared tiny configs build (models/data/tiny-arch-configs.json: hidden 64, 4 layers),
optionally quantized with mlx-lm.

Also runnable as a script:

    python -m models.tiny OUT_DIR [ARCH...]

which writes OUT_DIR/<arch> for each ARCH (default: all of ARCHITECTURES).
"""

from __future__ import annotations

import json
import re
import sys
import zlib
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, quantize_model

ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3")

HIDDEN_SIZE = 64
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE_SIZE = 128
VOCAB_SIZE = 512
NUM_SHARDS = 2

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
EOS_TOKEN_ID = SPECIAL_TOKENS.index(EOS_TOKEN)
PAD_TOKEN = "<|endoftext|>"

ENGLISH_TEXT = Path(__file__).parent / "data" / "english.txt"
# Configs that build every mlx-lm 0.32.2 model type: `base` merged with `overrides[type]`.
SHARED_CONFIGS = Path(__file__).parent / "data" / "tiny-arch-configs.json"
SHARED_LAYERS = 4  # their per-layer patterns (layer_types, ...) are for 4 layers

# Same split regex as transformers' Qwen2Tokenizer (see tokenizer_json).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Init scales, tuned by eye so greedy decoding of a random model wanders over
# the vocabulary instead of looping on one token. Linear weights get
# LINEAR_GAIN / sqrt(fan_in) (std 0.18-0.25 here); with gain 1 the blocks add
# too little to the embedding and tied models just predict their input token.
EMBED_STD = 1.0
LINEAR_GAIN = 2.0
BIAS_STD = 0.1
NORM_JITTER = 0.1

_COMMON_CONFIG = {
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": INTERMEDIATE_SIZE,
    "num_attention_heads": NUM_HEADS,
    "num_key_value_heads": NUM_KV_HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": VOCAB_SIZE,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "bos_token_id": None,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
}

# Per-arch settings chosen to cover different code paths (tied vs separate
# head, attention bias, q/k norms, sliding windows, fused projections).
_ARCH_CONFIG: dict[str, dict] = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "tie_word_embeddings": False,
        "rope_theta": 1000000.0,
    },
    "mistral": {
        "architectures": ["MistralForCausalLM"],
        "tie_word_embeddings": False,
        "sliding_window": None,
    },
    "gemma3_text": {
        "architectures": ["Gemma3ForCausalLM"],
        # mlx-lm ties gemma3_text when lm_head.weight is absent from the files.
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": HEAD_DIM,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        # Layers 2 and 5 (of 6) are global, the rest slide over 16 tokens,
        # so a ~40 token prompt exercises both mask kinds and RotatingKVCache.
        "sliding_window": 16,
        "sliding_window_pattern": 3,
    },
    "phi3": {
        "architectures": ["Phi3ForCausalLM"],
        "tie_word_embeddings": False,
        "rope_scaling": None,
        "original_max_position_embeddings": 2048,
    },
}


@lru_cache(maxsize=1)
def _shared_configs() -> dict:
    return json.loads(SHARED_CONFIGS.read_text())


def shared_types() -> list[str]:
    """The mlx-lm model types the shared configs name an override for, and the rest of
    mlx-lm's types, which build from `base` alone (the caller sees which do)."""
    return sorted(_shared_configs()["overrides"])


def shared_config(model_type: str) -> dict:
    """The shared tiny config of `model_type` (vocabulary of 128)."""
    configs = _shared_configs()
    return {**configs["base"], **configs["overrides"].get(model_type, {}), "model_type": model_type}


def _with_vocab(config: dict) -> dict:
    """`config` sized for the real tokenizer, nested text configs too."""
    sized = config | {"vocab_size": VOCAB_SIZE} | ({"num_vocab": VOCAB_SIZE} if "num_vocab" in config else {})
    if isinstance(config.get("text_config"), dict):
        sized["text_config"] = config["text_config"] | {"vocab_size": VOCAB_SIZE}
    return sized


def model_config(arch: str, num_layers: int = 6, dtype: str = "float32", **sizes: int) -> dict:
    """The config.json contents for `arch`; `sizes` override the tiny defaults
    (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim, vocab_size)."""
    if arch not in ARCHITECTURES:
        if num_layers != SHARED_LAYERS:
            raise ValueError(f"{arch} comes from the shared tiny configs, which have {SHARED_LAYERS} layers")
        tokens = {k: _COMMON_CONFIG[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return _with_vocab(shared_config(arch)) | tokens | sizes | {"torch_dtype": dtype}
    config = {"model_type": arch, **_COMMON_CONFIG, **_ARCH_CONFIG[arch], **sizes}
    config["num_hidden_layers"] = num_layers
    config["torch_dtype"] = dtype
    return config


def _build_model(config: dict) -> nn.Module:
    """Instantiate the mlx-lm Model class so parameter names and shapes match it."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if config["model_type"] == "gemma3_text":
        # Same effect as its sanitize() when lm_head.weight is absent.
        model.tie_word_embeddings = True
        model.pop("lm_head")
    return model


def _param_key(seed: int, name: str) -> mx.array:
    """A PRNG key per parameter, so values don't depend on creation order or layer count."""
    return mx.random.key(zlib.crc32(f"{seed}:{name}".encode()))


def _init_param(arch: str, name: str, shape: tuple[int, ...], seed: int, hidden_size: int = HIDDEN_SIZE) -> mx.array:
    """Random value for one parameter, scaled by its role."""
    noise = mx.random.normal(shape, key=_param_key(seed, name))
    if name.endswith("norm.weight"):
        # Around 1 for every arch. Gemma's RMSNorm scales by (1 + weight), so
        # it gets ~2, which enlarges its sandwich-normed block outputs relative
        # to the embedding; at scale ~1 its greedy output looped on one or two tokens.
        # Jitter makes a loader that drops or swaps norm weights visible.
        return 1.0 + NORM_JITTER * noise
    if "embed_tokens" in name:
        # Gemma multiplies embeddings by sqrt(hidden_size) in the forward pass;
        # a further 0.5 stopped its greedy output settling into a one-token
        # loop within 200 tokens (seen for seed 0 at 1.0).
        scale = 0.5 * hidden_size**-0.5 if arch.startswith("gemma") else 1.0
        return scale * EMBED_STD * noise
    if name.endswith(".bias"):
        return BIAS_STD * noise
    return (LINEAR_GAIN / shape[-1] ** 0.5) * noise


def _tuned(arch: str, name: str, value: mx.array) -> bool:
    """Whether `_init_param` sets a parameter: all of the hand-tuned architectures', and
    the matrices of the others; their other parameters (SSM decay, convolutions, norms
    of unusual forms) keep the values their mlx-lm module starts them at."""
    return arch in ARCHITECTURES or (value.ndim >= 2 and "norm" not in name and "conv" not in name)


def random_weights(
    arch: str, *, num_layers: int = 6, seed: int = 0, dtype: str = "float32", **sizes: int
) -> dict[str, mx.array]:
    """HF-named random weights for `arch`, sorted by name; `sizes` as for model_config."""
    config = model_config(arch, num_layers, dtype, **sizes)
    mx.random.seed(seed)  # the initial values modules pick for themselves
    model = _build_model(config)
    params = dict(tree_flatten(model.parameters()))
    target = getattr(mx, dtype)
    hidden = config.get("hidden_size", HIDDEN_SIZE)
    weights = {
        n: (_init_param(arch, n, params[n].shape, seed, hidden) if _tuned(arch, n, params[n]) else params[n]).astype(target)
        for n in sorted(params)
    }
    mx.eval(weights)
    return weights


def quantized(config: dict, weights: dict[str, mx.array], bits: int) -> tuple[dict, dict]:
    """`weights` and `config` quantized by mlx-lm (groups of 32: the tiny MoE and latent
    dimensions are 32 wide)."""
    model = _build_model(config)
    model.load_weights(list(weights.items()))
    model, config = quantize_model(model, config, group_size=32, bits=bits)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    return dict(sorted(weights.items())), config


def shard_index(name: str, num_layers: int) -> int:
    """Which shard holds `name`: embeddings + first half of layers, then the rest + norm/head."""
    match = re.search(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.", name)
    if match:
        return 0 if int(match[1]) < (num_layers + 1) // 2 else 1
    return 0 if "embed" in name or "wte" in name else 1


def _shard_file(i: int) -> str:
    return f"model-{i + 1:05d}-of-{NUM_SHARDS:05d}.safetensors"


def _write_weights(weights: dict[str, mx.array], out_dir: Path, num_layers: int) -> None:
    """Save weights as NUM_SHARDS safetensors files plus model.safetensors.index.json."""
    shards: list[dict[str, mx.array]] = [{} for _ in range(NUM_SHARDS)]
    for name, value in weights.items():
        shards[shard_index(name, num_layers)][name] = value
    for i, shard in enumerate(shards):
        mx.save_safetensors(str(out_dir / _shard_file(i)), shard, metadata={"format": "mlx"})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values()), "format": "mlx"},
        "weight_map": {n: _shard_file(shard_index(n, num_layers)) for n in weights},
    }
    _write_json(out_dir / "model.safetensors.index.json", index)


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """Train a byte-level BPE tokenizer of VOCAB_SIZE tokens on models/data/english.txt."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    # Qwen2-style normalizer and pre-tokenizer (digits split one by one):
    # transformers forces its Qwen2Tokenizer, which rebuilds exactly these, on
    # model_type qwen2, so using them everywhere makes all archs tokenize alike.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # The full byte alphabet lets any text round-trip, not just the training text.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(ENGLISH_TEXT.read_text().splitlines(), trainer)
    # The model's vocab_size is fixed; ids beyond the tokenizer would decode to nothing.
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    return tokenizer.to_str()


def _write_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    (out_dir / "tokenizer.json").write_text(tokenizer_json())
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": None,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 2048,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out_dir / "special_tokens_map.json",
        {
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != PAD_TOKEN],
        },
    )


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def make_tiny_model(
    arch: str, out_dir: Path, *, num_layers: int | None = None, seed: int = 0, dtype: str = "float32",
    bits: int | None = None, **sizes: int,
) -> Path:
    """Write an mlx-lm model directory for `arch` into out_dir and return it; with `bits`,
    quantized by mlx-lm. `num_layers` defaults to 6 for ARCHITECTURES, 4 for the others;
    `sizes` override config entries as for model_config."""
    num_layers = num_layers or (6 if arch in ARCHITECTURES else SHARED_LAYERS)
    if arch == "gemma3_text" and num_layers < _ARCH_CONFIG[arch]["sliding_window_pattern"]:
        raise ValueError("gemma3_text needs num_layers >= sliding_window_pattern (3)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model_config(arch, num_layers, dtype, **sizes)
    weights = random_weights(arch, num_layers=num_layers, seed=seed, dtype=dtype, **sizes)
    if bits is not None:
        weights, config = quantized(config, weights, bits)
    _write_json(out_dir / "config.json", config)
    _write_weights(weights, out_dir, num_layers)
    _write_tokenizer(out_dir)
    return out_dir


def main(argv: list[str]) -> int:
    """CLI: python -m models.tiny OUT_DIR [ARCH...] writes OUT_DIR/<arch> for each arch."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    out_root, archs = Path(argv[0]), argv[1:] or list(ARCHITECTURES)
    for arch in archs:
        print(make_tiny_model(arch, out_root / arch))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
