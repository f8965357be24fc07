"""Build Hugging Face tokenizer files from a GGUF's `tokenizer.*` metadata.

transformers' GGUF integration does the building (byte-level BPE with each llama.cpp
pre-tokenizer's split regex, SentencePiece with Gemma's and Phi-3's quirks, control and
user-defined tokens); here only what it leaves out: pre-tokenizers it does not know,
the BOS that llama.cpp adds, and tokenizer_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, pre_tokenizers, processors
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    GGUF_PRE_TOKENIZER_SPLITS,
    GGUF_TOKENIZER_MAPPING,
    GGUF_TOKENIZER_TYPES,
    convert_gguf_tokenizer,
)

# llama.cpp pre-tokenizers that transformers leaves at GPT-2's regex, and what they are.
_EXTRA_PRE_TOKENIZERS = {
    # SmolLM2: every digit is its own pre-token, then GPT-2 byte-level splitting.
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    ),
}
# Byte-level vocabularies whose pre-tokenizer is plain GPT-2 (transformers' default).
_GPT2_PRE_TOKENIZERS = ("default", "gpt2")
SUPPORTED_PRE_TOKENIZERS = sorted({*GGUF_PRE_TOKENIZER_SPLITS, *_EXTRA_PRE_TOKENIZERS, *_GPT2_PRE_TOKENIZERS})


def check_tokenizer(metadata: dict[str, Any]) -> None:
    """ValueError naming the tokenizer model or pre-tokenizer that cannot be built."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind not in GGUF_TOKENIZER_TYPES:
        raise ValueError(
            f"unsupported GGUF tokenizer model {kind!r}; supported: {', '.join(GGUF_TOKENIZER_TYPES)}"
        )
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if kind == "gpt2" and pre not in SUPPORTED_PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}"
        )


def build_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """The tokenizer llama.cpp builds from the metadata (`check_tokenizer` passed)."""
    kind = metadata["tokenizer.ggml.model"]
    pre = metadata.get("tokenizer.ggml.pre", "default")
    fields = {
        name: metadata[f"tokenizer.{key}"]
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in metadata
    }
    tokenizer, _ = convert_gguf_tokenizer(metadata["general.architecture"], fields)
    if pre in _EXTRA_PRE_TOKENIZERS:
        tokenizer.pre_tokenizer = _EXTRA_PRE_TOKENIZERS[pre]()
    tokenizer.post_processor = _post_processor(metadata, kind)
    return tokenizer


def write_tokenizer(tokenizer: Tokenizer, metadata: dict[str, Any], context_length: int, dst: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into `dst`."""
    tokenizer.save(str(dst / "tokenizer.json"))
    config = tokenizer_config(metadata, context_length)
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


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


def _post_processor(metadata: dict[str, Any], kind: str) -> processors.PostProcessor:
    """BOS first where the file asks for it (llama.cpp's default for SentencePiece)."""
    byte_level = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")
    if not add_bos or metadata.get("tokenizer.ggml.bos_token_id") is None:
        return processors.Sequence(byte_level)
    bos_id = metadata["tokenizer.ggml.bos_token_id"]
    bos = metadata["tokenizer.ggml.tokens"][bos_id]
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return processors.Sequence([*byte_level, template])
