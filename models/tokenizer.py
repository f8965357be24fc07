"""Build Hugging Face tokenizer files from a GGUF's `tokenizer.*` metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) mapped to their HF equivalents.
_PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    # SmolLM2: every digit is its own pre-token, then GPT-2 byte-level splitting.
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    ),
}


def write_tokenizer(metadata: dict[str, Any], context_length: int, dst: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into `dst`."""
    build_tokenizer(metadata).save(str(dst / "tokenizer.json"))
    config = tokenizer_config(metadata, context_length)
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def build_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """A byte-level BPE tokenizer equal to the one llama.cpp builds from the metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (only byte-level BPE 'gpt2')")
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre!r} (supported: {', '.join(_PRE_TOKENIZERS)})"
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(metadata)
    _add_special_tokens(tokenizer, metadata)
    return tokenizer


def tokenizer_config(metadata: dict[str, Any], context_length: int) -> dict[str, Any]:
    """tokenizer_config.json: special tokens and chat template from the metadata."""
    tokens = metadata["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        # The generic class: a model-specific one may rebuild the pipeline and drop
        # the pre-tokenizer defined in tokenizer.json.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
    }
    for name in ("bos", "eos", "unknown", "padding"):
        token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            key = {"unknown": "unk", "padding": "pad"}.get(name, name)
            config[f"{key}_token"] = tokens[token_id]
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return config


def _post_processor(metadata: dict[str, Any]) -> processors.PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
    if not metadata.get("tokenizer.ggml.add_bos_token", False):
        return byte_level
    bos_id = metadata["tokenizer.ggml.bos_token_id"]
    bos = metadata["tokenizer.ggml.tokens"][bos_id]
    add_bos = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return processors.Sequence([byte_level, add_bos])


def _add_special_tokens(tokenizer: Tokenizer, metadata: dict[str, Any]) -> None:
    """Control tokens become special, user-defined ones plain added tokens (as in llama.cpp)."""
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type", [])
    special = [tokens[i] for i, kind in enumerate(types) if kind == TokenType.CONTROL]
    user = [tokens[i] for i, kind in enumerate(types) if kind == TokenType.USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
