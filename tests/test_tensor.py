"""PARALLEL=tensor on real ranks: every rank holds 1/N of every layer.

Outputs are compared with mlx-lm's own tensor parallelism (`model.shard(group)`, run by
tests/shard_reference.py under the same launcher and world size), token for token: one
process would sum the all-reduced parts in another order, so its bits differ.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import httpx
import mlx.core as mx
import pytest
from conftest import PROMPT, REPO, generate_json, launch_command, rank_env, run_launch, run_ranks

from harness import wait_for, ring_and_api
from test_batching import _chat, _heartbeat, _text

from models.tiny import make_tiny_model

MAX_TOKENS = 24
CHUNKED = {"PREFILL_STEP_SIZE": "16"}
ARCHS = ("llama", "qwen2", "qwen3")
LAUNCHES = [(2, "mpi"), (2, "ring")]


@lru_cache(maxsize=None)
def _shard_reference(ranks: int, backend: str, jobs: str) -> dict:
    """mlx-lm's `model.shard()` run on `ranks` ranks of `backend`: {model: [ids per prompt]}."""
    command = launch_command(ranks, backend, [])[:-1]  # the launcher, without server.py
    command += [str(REPO / "tests" / "shard_reference.py"), jobs]
    proc = run_launch(command, rank_env({}), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shard_reference(ranks: int, backend: str, models: list[Path], prompts: list[dict], max_tokens: int,
                    prefill_step_size: int = 16, **kwargs) -> dict[str, list[list[int]]]:
    jobs = {"models": [str(m) for m in models], "prompts": prompts, "max_tokens": max_tokens,
            "prefill_step_size": prefill_step_size, "kwargs": kwargs}
    return _shard_reference(ranks, backend, json.dumps(jobs))


def expected_parameter_bytes(path: Path, layers: list[int], parts: int, first: bool = True,
                             last: bool = True) -> int:
    """Bytes of a rank's part of the checkpoint, when its stage holds `layers` [start,
    end) and splits them in `parts`: 1/parts of each layer's projections (their output
    rows, or input columns for o_proj and down_proj, whose bias is whole); on the first
    stage the embedding whole; on the last the final norm and 1/parts of the head's
    vocabulary rows (a tied embedding's, where that is not the first stage too)."""
    tensors = {}
    for file in path.glob("*.safetensors"):
        tensors.update(mx.load(str(file)))
    tied = "lm_head.weight" not in tensors
    total = 0
    for name, value in tensors.items():
        if ".layers." in name:
            if not layers[0] <= int(name.split(".layers.")[1].split(".")[0]) < layers[1]:
                continue
            split = name.endswith("proj.weight") or (name.endswith("proj.bias") and "o_proj" not in name
                                                       and "down_proj" not in name)
        elif name.startswith("lm_head."):
            if not last:
                continue
            split = True
        elif "embed_tokens" in name:
            if not (first or (last and tied)):
                continue
            split = not first
        elif last:
            split = False
        else:
            continue
        total += value.nbytes // parts if split else value.nbytes
    return total


@pytest.mark.parametrize("ranks,backend", LAUNCHES, ids=lambda v: str(v))
@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_matches_mlx_lm_shard(tiny_models, arch, ranks, backend):
    models = [tiny_models[a] for a in ARCHS]
    expected = shard_reference(ranks, backend, models, [{"text": PROMPT, "chat": False}], MAX_TOKENS)
    path = tiny_models[arch]
    settings = {"MODEL_REPO": str(path), "PARALLEL": "tensor"} | CHUNKED
    out = generate_json(ranks, backend, settings, ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS)])
    assert out["token_ids"] == expected[str(path)][0]
    assert out["parallel"]["mode"] == "tensor"
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    for r in out["ranks"]:
        assert r["layers"] == [0, layers] and r["shard"] == [r["rank"], ranks]
        assert r["parameter_bytes"] == expected_parameter_bytes(path, [0, layers], ranks)


MOE_ARCHS = ("qwen3_moe", "deepseek_v3")  # experts split by mlx-lm's shard(); deepseek's latent attention


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {arch: make_tiny_model(arch, root / arch) for arch in MOE_ARCHS}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_mixture_of_experts_match_mlx_lm_shard(moe_models, arch):
    expected = shard_reference(2, "mpi", [moe_models[a] for a in MOE_ARCHS], [{"text": PROMPT, "chat": False}],
                               MAX_TOKENS)
    settings = {"MODEL_REPO": str(moe_models[arch]), "PARALLEL": "tensor"} | CHUNKED
    out = generate_json(2, "mpi", settings, ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS)])
    assert out["token_ids"] == expected[str(moe_models[arch])][0]
    assert [r["shard"] for r in out["ranks"]] == [[0, 2], [1, 2]]


def test_four_ranks_match_mlx_lm_shard(tmp_path):
    # Four key-value heads, one per rank (mlx-lm's shard() splits them too).
    path = make_tiny_model("llama", tmp_path / "llama", num_key_value_heads=4)
    expected = shard_reference(4, "mpi", [path], [{"text": PROMPT, "chat": False}], MAX_TOKENS)
    settings = {"MODEL_REPO": str(path), "PARALLEL": "tensor"} | CHUNKED
    out = generate_json(4, "mpi", settings, ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS)])
    assert out["token_ids"] == expected[str(path)][0]
    assert [r["parameter_bytes"] for r in out["ranks"]] == [expected_parameter_bytes(path, [0, 6], 4)] * 4


def test_kv_bits_in_tensor_mode_match_mlx_lm_shard(tmp_path):
    # Heads of 32 dimensions: KV_GROUP_SIZE is at least 32.
    path = make_tiny_model("qwen2", tmp_path / "qwen2", hidden_size=128, head_dim=32)
    quantized = {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 8}
    expected = shard_reference(2, "mpi", [path], [{"text": PROMPT, "chat": False}], MAX_TOKENS, **quantized)
    settings = {"MODEL_REPO": str(path), "PARALLEL": "tensor", "KV_BITS": "4", "KV_GROUP_SIZE": "32",
                "QUANTIZED_KV_START": "8"} | CHUNKED
    out = generate_json(2, "mpi", settings, ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS)])
    assert out["token_ids"] == expected[str(path)][0]


def test_auto_picks_tensor_on_mpi(tiny_models):
    settings = {"MODEL_REPO": str(tiny_models["llama"]), "PARALLEL": "auto"}
    out = generate_json(2, "mpi", settings, ["--prompt", "hi", "--max-tokens", "2"])
    parallel = out["parallel"]
    assert parallel["requested"] == "auto" and parallel["mode"] == "tensor", parallel
    assert parallel["token_ms"]["tensor"] < parallel["token_ms"]["pipeline"]
    assert parallel["all_reduce_us"] > 0 and parallel["layer_ms"] > 0


def test_a_model_without_shard(tiny_models):
    """gemma3_text has no shard(): tensor mode refuses it naming the reason, auto runs the pipeline."""
    settings = {"MODEL_REPO": str(tiny_models["gemma3_text"])}
    proc = run_ranks(2, "mpi", settings | {"PARALLEL": "tensor"}, ["--prompt", "hi", "--max-tokens", "2"])
    assert proc.returncode != 0
    assert "PARALLEL=tensor: mlx-lm's 'gemma3_text' model defines no shard()" in proc.stderr
    out = generate_json(2, "mpi", settings | {"PARALLEL": "auto"}, ["--prompt", "hi", "--max-tokens", "2"])
    assert out["parallel"]["mode"] == "pipeline" and "no shard()" in out["parallel"]["reason"]
    assert [r["layers"] for r in out["ranks"]] == [[0, 3], [3, 6]]


# Requests that start while others run, through the API and the spool.
JOINING = [
    ("Tell me about the harbour town of Wexley and its old fishing fleet.", 60, 0.0),
    ("Hi", 40, 0.05),
    ("Why is the sea salty? " * 4, 50, 0.1),
    ("One word.", 7, 0.2),
]


# Tensor mode on 2 ranks; 2 stages of 2 ranks (TENSOR_PARALLEL=2), which compute the same bits.
LAYOUTS = [(2, {}, "tensor", 1), (4, {"TENSOR_PARALLEL": "2"}, "hybrid", 2)]


@pytest.mark.parametrize("ranks,layout,mode,micro_batches", LAYOUTS, ids=["tensor", "hybrid"])
def test_batching_and_prompt_cache_in_tensor_mode(tiny_models, tmp_path, ranks, layout, mode, micro_batches):
    model = tiny_models["llama"]
    prompts = [{"text": c, "chat": True} for c, _, _ in JOINING]
    expected = shard_reference(2, "mpi", [model], prompts, max(n for _, n, _ in JOINING))[str(model)]
    with ring_and_api(model, tmp_path / "spool", ranks, PARALLEL="tensor", MICRO_BATCHES="2", **layout,
                      **CHUNKED) as (api, _):
        health = httpx.get(f"{api.url}/health").json()
        assert health["parallel"]["mode"] == mode
        assert [r["shard"] for r in health["ranks"]] == [[0, 2], [1, 2]] * (ranks // 2)
        # Every rank of a stage works on each of its steps: a second micro-batch per
        # stage would only halve the batch.
        assert _heartbeat(api)["micro_batches"] == micro_batches
        for round_ in range(2):  # the second time from the prompt cache
            with ThreadPoolExecutor(len(JOINING)) as pool:
                futures = [pool.submit(_chat, api, model, [{"role": "user", "content": c}], n, d)
                           for c, n, d in JOINING]
                replies = [f.result() for f in futures]
            for (content, max_tokens, _), reply, tokens in zip(JOINING, replies, expected):
                tokens = tokens[:max_tokens]
                assert reply["text"] == _text(model, tokens), (round_, content)
                assert reply["finish_reason"] == ("length" if len(tokens) == max_tokens else "stop")
            # They really ran together (rank 0 writes a heartbeat a second).
            assert wait_for(lambda: _heartbeat(api).get("peak_active", 0) >= 3)
    # The second time, all but the last prompt token came from the prompt cache.
    assert [r["usage"].prompt_tokens_details.cached_tokens for r in replies] == \
        [r["usage"].prompt_tokens - 1 for r in replies]


def test_status_shows_the_mode_and_each_ranks_shard():
    """The lines ./launch.sh status prints from the heartbeat's records."""
    from launcher.status import parallel_line, rank_row

    parallel = {"mode": "tensor", "requested": "auto", "reason": "estimated 1.0 ms a token split by tensor, "
                "2.0 ms by pipeline", "all_reduce_us": 15.0, "ring_trip_us": 30.0, "bandwidth_mb_s": 3000.0}
    assert parallel_line(parallel) == ("parallel: tensor (PARALLEL=auto: estimated 1.0 ms a token split by tensor, "
                                       "2.0 ms by pipeline; all-reduce 15.0 us, ring trip 30.0 us, 3000.0 MB/s)")
    rows = [rank_row({"rank": r, "pid": 100 + r, "layers": [0, 6], "shard": [r, 2], "memory": 2**30, "host": "h",
                      "blas": "openblas /lib"}, "local", "yes").split() for r in range(2)]
    assert rows == [["0", "local", "h", "100", "0-5", "1.0GiB", "openblas", "1/2", "yes"],
                    ["1", "local", "h", "101", "0-5", "1.0GiB", "openblas", "2/2", "yes"]]
    assert rank_row({"rank": 0, "layers": [0, 3]}, "local", "yes").split()[7] == "whole"
