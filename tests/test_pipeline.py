"""The ring's output equals single-process mlx-lm, token for token, on real ranks."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import (
    PROMPT, PYTHON, REPO, generate_json, mpi_command, rank_env, reference_tokens, run_launch, run_ranks,
)
from models.tiny import ARCHITECTURES

from distributed.anatomy import AFTER, BEFORE, discover, get_path
from distributed.loading import plan_anatomy, stage_weight_files
from distributed.shard import SharedHead, Stage

MAX_TOKENS = 24
# Chunked prefill: the prompt spans several chunks, as mlx-lm would do them.
CHUNKED = {"PREFILL_STEP_SIZE": "16"}
LAUNCHES = [(2, "mpi"), (3, "mpi"), (2, "ring")]


@pytest.mark.parametrize("ranks,backend", LAUNCHES, ids=lambda v: str(v))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ring_matches_mlx_lm(tiny_models, arch, ranks, backend):
    path = tiny_models[arch]
    expected = reference_tokens(path, PROMPT, MAX_TOKENS, prefill_step_size=16)
    out = generate_json(
        ranks, backend, {"MODEL_REPO": str(path)} | CHUNKED, ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS)]
    )
    assert out["token_ids"] == expected
    assert out["finish_reason"] == ("length" if len(expected) == MAX_TOKENS else "stop")
    assert [r["layers"] for r in out["ranks"]][0][0] == 0


def test_world_of_one_matches_mlx_lm(tiny_models):
    path = tiny_models["qwen3"]
    out = generate_json(1, "any", {"MODEL_REPO": str(path)}, ["--prompt", PROMPT, "--max-tokens", "16", "--chat"])
    assert out["token_ids"] == reference_tokens(path, PROMPT, 16, chat=True)


def test_world_of_one_under_mpirun_exits_cleanly(tiny_models):
    """MLX initializes MPI for a world of one but leaves finalizing it to us; without that,
    mpirun calls the exit abnormal and fails even though the answer was printed."""
    path = tiny_models["llama"]
    command = mpi_command(1, PYTHON, str(REPO / "server.py"), "--prompt", PROMPT, "--max-tokens", "8", "--json")
    proc = run_launch(command, rank_env({"MODEL_REPO": str(path), "BACKEND": "mpi"}), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["token_ids"] == reference_tokens(path, PROMPT, 8)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_uneven_split(tiny_models, arch):
    path = tiny_models[arch]
    out = generate_json(
        3, "mpi", {"MODEL_REPO": str(path), "LAYER_SPLIT": "1,2,3"} | CHUNKED, ["--prompt", PROMPT, "--max-tokens", "16"]
    )
    assert [r["layers"] for r in out["ranks"]] == [[0, 1], [1, 3], [3, 6]]
    assert out["token_ids"] == reference_tokens(path, PROMPT, 16, prefill_step_size=16)


def test_memory_split(tiny_models):
    path = tiny_models["mistral"]
    out = generate_json(2, "mpi", {"MODEL_REPO": str(path), "LAYER_SPLIT": "memory"}, ["--prompt", PROMPT, "--max-tokens", "16"])
    layers = [r["layers"] for r in out["ranks"]]
    assert layers[0][0] == 0 and layers[-1][1] == 6 and all(b > a for a, b in layers)
    assert out["token_ids"] == reference_tokens(path, PROMPT, 16)


def expected_parameter_bytes(path: Path, start: int, end: int, first: bool, last: bool) -> int:
    """Bytes of the checkpoint tensors a stage of a ring should hold: rank 0 and the
    last rank share the head, each holding its half of the vocabulary's rows (rank 0
    a tied embedding whole, for its lookup)."""
    import mlx.core as mx

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file in set(index.values()):
        tensors.update(mx.load(str(path / file)))
    tied = "lm_head.weight" not in tensors
    head = "model.embed_tokens." if tied else "lm_head."
    total = 0
    for name, value in tensors.items():
        parts = name.split(".")
        split = value.shape[0] // 2
        if "layers" in parts:
            kept = value if start <= int(parts[parts.index("layers") + 1]) < end else value[:0]
        elif name.startswith(head):
            kept = value if first and tied else value[:split] if first else value[split:] if last else value[:0]
        elif "embed_tokens" in name:
            kept = value if first else value[:0]
        else:  # final norm
            kept = value if last else value[:0]
        total += kept.nbytes
    return total


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_each_rank_loads_only_its_share(tiny_models, arch):
    path = tiny_models[arch]
    out = generate_json(3, "mpi", {"MODEL_REPO": str(path)}, ["--prompt", "hi", "--max-tokens", "2"])
    for r in out["ranks"]:
        start, end = r["layers"]
        first, last = r["rank"] == 0, r["rank"] == len(out["ranks"]) - 1
        assert r["parameter_bytes"] == expected_parameter_bytes(path, start, end, first, last)


def test_stage_weight_files_pick_only_local_layers(tiny_models):
    index = json.loads((tiny_models["llama"] / "model.safetensors.index.json").read_text())["weight_map"]
    anatomy = plan_anatomy(tiny_models["llama"])
    first, second = sorted(set(index.values()))  # layers 0-2 + embedding, layers 3-5 + norm
    assert stage_weight_files(index, Stage(0, 3, 0, 2), anatomy) == {first}
    assert stage_weight_files(index, Stage(1, 3, 3, 5), anatomy) == {second}
    # llama ties its head to the embedding, so the last stage needs it too.
    assert stage_weight_files(index, Stage(2, 3, 5, 6), anatomy) == {first, second}


def test_stage_weight_files_give_rank_0_of_a_ring_an_untied_head(tiny_models):
    index = json.loads((tiny_models["qwen3"] / "model.safetensors.index.json").read_text())["weight_map"]
    anatomy = plan_anatomy(tiny_models["qwen3"])
    first, second = sorted(set(index.values()))  # layers 0-2 + embedding, layers 3-5 + norm + lm_head
    assert stage_weight_files(index, Stage(0, 3, 0, 2), anatomy) == {first, second}  # for lm_head, which it shares
    assert stage_weight_files(index, Stage(1, 3, 2, 3), anatomy) == {first}  # a middle stage: no head


@pytest.mark.parametrize("which", ["qwen2", "qwen3", "default"])
def test_a_shared_heads_halves_are_the_whole_heads_logits(tiny_models, default_model, which):
    """For one sequence, rank 0 and the last rank each compute half of the vocabulary's
    logits; joined, they are the bits of the whole head (tied, untied, quantized). Each
    holds only its half of the head's rows, but rank 0 a tied embedding whole (its lookup)."""
    from mlx_lm import load

    model, _ = load(str(default_model if which == "default" else tiny_models[which]))
    x = mx.random.normal((1, 1, model.args.hidden_size), key=mx.random.key(0))
    tied = "lm_head" not in model
    whole = model.model.embed_tokens.as_linear(x) if tied else model.lm_head(x)
    anatomy = discover(model)
    module = get_path(model, anatomy.head.path)
    first = SharedHead(module, anatomy, {BEFORE}, last=False)
    last = SharedHead(module, anatomy, {AFTER}, last=True)
    halves = [first.logits(x, 0, first.split), getattr(last, last.method)(x)]  # the forward pass's call
    assert [h.shape[-1] for h in halves] == [first.split, first.vocab - first.split]
    assert mx.array_equal(mx.concatenate(halves, axis=-1), whole).item()
    rows = [first["module"].weight.shape[0], last["module"].weight.shape[0]]
    assert rows == [first.vocab if tied else first.split, first.vocab - first.split]


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_rotating_kv_cache_matches_mlx_lm(tiny_models, arch):
    path = tiny_models[arch]
    settings = {"MODEL_REPO": str(path), "KV_CACHE_MAX_SIZE": "24"} | CHUNKED
    out = generate_json(2, "mpi", settings, ["--prompt", PROMPT, "--max-tokens", "30"])
    expected = reference_tokens(path, PROMPT, 30, prefill_step_size=16, max_kv_size=24)
    assert out["token_ids"] == expected
    assert out["token_ids"] != reference_tokens(path, PROMPT, 30, prefill_step_size=16)


def test_quantized_kv_cache_matches_mlx_lm(default_model):
    settings = {"MODEL_REPO": str(default_model), "KV_BITS": "4", "KV_GROUP_SIZE": "64", "QUANTIZED_KV_START": "8"}
    prompt = "Write one sentence about the sea."
    out = generate_json(2, "mpi", settings, ["--prompt", prompt, "--chat", "--max-tokens", "16"])
    expected = reference_tokens(default_model, prompt, 16, chat=True, kv_bits=4, kv_group_size=64, quantized_kv_start=8)
    assert out["token_ids"] == expected


def test_seeded_sampling_is_reproducible(tiny_models):
    settings = {"MODEL_REPO": str(tiny_models["llama"])}
    args = ["--prompt", PROMPT, "--max-tokens", "20", "--temperature", "1.0", "--top-k", "50"]
    first = generate_json(2, "mpi", settings, [*args, "--seed", "7"])
    again = generate_json(2, "mpi", settings, [*args, "--seed", "7"])
    other = generate_json(2, "mpi", settings, [*args, "--seed", "8"])
    assert first["token_ids"] == again["token_ids"]
    assert first["token_ids"] != other["token_ids"]


@pytest.mark.parametrize(
    "settings,ranks,named",
    [
        ({"KV_BITS": "3"}, 1, "KV_BITS"),
        ({"BACKEND": "tcp"}, 1, "BACKEND"),
        ({"LAYER_SPLIT": "two"}, 1, "LAYER_SPLIT"),
        ({"LAYER_SPLIT": "1,1"}, 3, "LAYER_SPLIT"),
        ({"LAYER_SPLIT": "1,2,2"}, 3, "LAYER_SPLIT"),
        ({"PREFILL_STEP_SIZE": "0"}, 1, "PREFILL_STEP_SIZE"),
    ],
)
def test_bad_settings_fail_naming_the_variable(tiny_models, settings, ranks, named):
    backend = settings.get("BACKEND", "mpi")
    proc = run_ranks(ranks, backend, {"MODEL_REPO": str(tiny_models["qwen2"])} | settings, ["--prompt", "hi"], timeout=120)
    assert proc.returncode != 0
    assert named in proc.stderr


def test_more_ranks_than_layers_is_a_clear_error(tmp_path):
    from models.tiny import make_tiny_model

    path = make_tiny_model("qwen2", tmp_path / "two-layers", num_layers=2)
    proc = run_ranks(3, "mpi", {"MODEL_REPO": str(path)}, ["--prompt", "hi"], timeout=120)
    assert proc.returncode != 0
    assert "3 ranks but the model has only 2 layers" in proc.stderr


def test_too_long_prompt_is_refused_and_every_rank_exits(tiny_models):
    settings = {"MODEL_REPO": str(tiny_models["llama"]), "MAX_SEQUENCE_LENGTH": "20"}
    proc = run_ranks(2, "mpi", settings, ["--prompt", PROMPT, "--max-tokens", "4"], timeout=120)
    assert proc.returncode != 0
    assert "MAX_SEQUENCE_LENGTH is 20" in proc.stderr

