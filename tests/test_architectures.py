"""mlx-lm's families on real ranks: mixture of experts, latent attention, hybrids, heads
with a transform after them. Greedy output equals single-process mlx-lm token for token,
alone (one-shot mode) and batched (serve mode behind the API); loading is strict; what
a model cannot do fails the start naming why.

Tiny random models with a real tokenizer, written from the shared tiny configs. The
default run covers 2 ranks under MPI; `-m slow` adds 3 ranks under MPI and 2 on MLX's
ring backend for every family, and serving for all of them.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import PROMPT, generate_json, reference_tokens, run_ranks
from harness import wait_for, ring_and_api
from test_batching import _chat, _expected, _heartbeat, _text

from models.tiny import make_tiny_model

# Each family with what makes it differ; deepseek_v2 is shaped like DeepSeek-Coder-V2-Lite
# (first layer dense, mixture of experts after, latent attention) and quantized to 8 bits.
FAMILIES = {
    "deepseek_v2": 8,
    "deepseek_v3": None,  # latent attention (a cache of unequal keys and values), sigmoid routing
    "qwen3_moe": None,
    "mixtral": None,
    "gpt_oss": None,  # sliding-window layers, attention sinks
    "glm4_moe": None,
    "llama4": None,  # text part of a multimodal model; its head is language_model.lm_head; chunked attention
    "gemma2": None,  # final logit softcap: the head is not shared
    "cohere": None,  # logit scale after a tied head
    "olmo2": None,
    "granite": None,  # logits divided after the head
    "starcoder2": None,
    "qwen3_next": None,  # hybrid: gated delta-net layers (SSM state) and attention
}
# Served alone and batched in the default run: the headline MoE, the hybrid, a head not
# shared, and chunked caches that cannot be batched; the rest with -m slow.
SERVED = {"deepseek_v2", "qwen3_next", "gemma2", "llama4"}
MAX_TOKENS = 20
CHUNKED = {"PREFILL_STEP_SIZE": "16"}
PREFILL_STEP = 16
CHATS = [
    ("Tell me about the harbour town of Wexley and its old fishing fleet.", 24),
    ("Hi", 16),
    ("Why is the sea salty? " * 3, 20),
]


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {arch: make_tiny_model(arch, root / arch, bits=bits) for arch, bits in FAMILIES.items()}


def _one_shot(path: Path, ranks: int, backend: str) -> None:
    expected = reference_tokens(path, PROMPT, MAX_TOKENS, prefill_step_size=PREFILL_STEP)
    out = generate_json(ranks, backend, {"MODEL_REPO": str(path)} | CHUNKED,
                        ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS)])
    assert out["token_ids"] == expected
    assert out["text"] == _text(path, expected)  # mlx-lm's streaming detokenizer


@pytest.mark.parametrize("arch", FAMILIES)
def test_two_ranks_match_mlx_lm(families, arch):
    _one_shot(families[arch], 2, "mpi")


@pytest.mark.slow
@pytest.mark.parametrize("ranks,backend", [(3, "mpi"), (2, "ring")], ids=str)
@pytest.mark.parametrize("arch", FAMILIES)
def test_more_ranks_and_the_ring_backend_match_mlx_lm(families, arch, ranks, backend):
    _one_shot(families[arch], ranks, backend)


def _serve(path: Path, tmp_path: Path) -> None:
    """One request alone, then several at once, then the first again (from the prompt
    cache where the model's caches allow one): each reply is mlx-lm's alone."""
    with ring_and_api(path, tmp_path / "spool", 2, MICRO_BATCHES="2", PREFILL_STEP_SIZE=str(PREFILL_STEP)) as (api, rank):
        alone = _chat(api, path, [{"role": "user", "content": CHATS[0][0]}], CHATS[0][1])
        with ThreadPoolExecutor(len(CHATS)) as pool:
            together = list(pool.map(lambda c: _chat(api, path, [{"role": "user", "content": c[0]}], c[1], 0.05), CHATS))
        again = _chat(api, path, [{"role": "user", "content": CHATS[0][0]}], CHATS[0][1])
        log = rank.log_path.read_text()
        # Sequences share batches where the model's caches merge (the log says why not).
        together_at_most = 1 if "batching off" in log else 2
        assert wait_for(lambda: _heartbeat(api).get("peak_active", 0) >= together_at_most, timeout=5)
    for (content, max_tokens), reply in zip(CHATS, together):
        assert {"text": reply["text"], "finish_reason": reply["finish_reason"]} == _expected(path, content, max_tokens)
    assert alone["text"] == again["text"] == together[0]["text"]
    if "prompt cache off" not in log:
        assert again["usage"].prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("arch", sorted(SERVED))
def test_served_alone_and_batched_match_mlx_lm(families, arch, tmp_path):
    _serve(families[arch], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(set(FAMILIES) - SERVED))
def test_every_family_served_alone_and_batched_matches_mlx_lm(families, arch, tmp_path):
    _serve(families[arch], tmp_path)


def test_chunked_caches_run_one_sequence_per_batch_and_say_why(families, tmp_path):
    path = families["llama4"]
    with ring_and_api(path, tmp_path / "spool", 2) as (api, rank):
        _chat(api, path, [{"role": "user", "content": "Hi"}], 4)
    assert "batching off: mlx-lm cannot merge its ChunkedKVCache into a batch" in rank.log_path.read_text()


def _rewrite(path: Path, change) -> None:
    """Apply `change(tensors)` to the tensors of each weight file of the model at `path`."""
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    weight_map = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors = mx.load(str(path / file))
        change(tensors)
        mx.save_safetensors(str(path / file), tensors, metadata={"format": "mlx"})
        weight_map |= dict.fromkeys(tensors, file)
    index_file.write_text(json.dumps(index | {"weight_map": weight_map}))


@pytest.mark.parametrize("tensor", ["language_model.lm_head.weight", "language_model.model.layers.3.post_attention_layernorm.weight"])
def test_a_missing_tensor_fails_the_start_naming_it(families, tmp_path, tensor):
    """llama4 keeps its head where the old file filter never looked; rank 0, which shares
    it, and the last rank both need it, and a random one would have served garbage."""
    path = tmp_path / "llama4"
    shutil.copytree(families["llama4"], path)
    _rewrite(path, lambda tensors: tensors.pop(tensor, None))
    proc = run_ranks(2, "mpi", {"MODEL_REPO": str(path)}, ["--prompt", "hi"], timeout=120)
    assert proc.returncode != 0
    assert "the checkpoint lacks 1 tensors" in proc.stderr and tensor in proc.stderr


def test_a_tensor_the_model_has_no_place_for_fails_the_start_naming_it(families, tmp_path):
    path = tmp_path / "olmo2"
    shutil.copytree(families["olmo2"], path)
    _rewrite(path, lambda tensors: tensors.update({"model.layers.0.mlp.extra.weight": mx.zeros((2, 2))}))
    proc = run_ranks(1, "any", {"MODEL_REPO": str(path)}, ["--prompt", "hi"], timeout=120)
    assert proc.returncode != 0
    assert "no place for" in proc.stderr and "model.layers.0.mlp.extra.weight" in proc.stderr


# Head dimensions KV_GROUP_SIZE divides (the tiny configs' 16 is less than any group).
KV_SIZES = {"head_dim": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32, "kv_lora_rank": 64}
QUANTIZED_KV = {"KV_BITS": "4", "KV_GROUP_SIZE": "32", "QUANTIZED_KV_START": "8"}


@pytest.mark.parametrize("arch", ["gemma2", "deepseek_v3", "gpt_oss"])
def test_kv_bits_where_the_model_cannot_use_them_fail_the_start(arch, tmp_path):
    """Their attention has no quantized path (softcapping, latent attention, sinks)."""
    path = make_tiny_model(arch, tmp_path / arch, **KV_SIZES)
    proc = run_ranks(2, "mpi", {"MODEL_REPO": str(path)} | QUANTIZED_KV, ["--prompt", "hi"], timeout=120)
    assert proc.returncode != 0
    assert f"KV_BITS=4 cannot be used with model type '{arch}'" in proc.stderr


def test_kv_bits_work_where_the_model_can_use_them(tmp_path):
    path = make_tiny_model("qwen3_moe", tmp_path / "qwen3_moe", **KV_SIZES)
    out = generate_json(2, "mpi", {"MODEL_REPO": str(path)} | QUANTIZED_KV, ["--prompt", PROMPT, "--max-tokens", "12"])
    assert out["token_ids"] == reference_tokens(path, PROMPT, 12, kv_bits=4, kv_group_size=32, quantized_kv_start=8)


def test_a_model_whose_layers_pass_more_than_the_hidden_state_is_refused(tmp_path):
    path = make_tiny_model("hunyuan", tmp_path / "hunyuan")
    proc = run_ranks(1, "any", {"MODEL_REPO": str(path)}, ["--prompt", "hi"], timeout=120)
    assert proc.returncode != 0
    assert "model type 'hunyuan' cannot be split into stages" in proc.stderr
    assert "do not each take and return one hidden array" in proc.stderr
