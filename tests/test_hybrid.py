"""TENSOR_PARALLEL=T on real ranks: pipeline stages of T ranks, tensor parallel within each.

With T=2 every all-reduce sums two parts, the same bits in either order, and the
stages hand each other the hidden state unchanged: 2 stages of 2 ranks compute what
tensor mode computes on 2 ranks. So their greedy output equals mlx-lm's own
`model.shard()` on 2 ranks, token for token.
"""

from __future__ import annotations

import json

import pytest
from conftest import PROMPT, generate_json, run_ranks
from test_tensor import CHUNKED, MAX_TOKENS, expected_parameter_bytes, shard_reference

from distributed.loading import plan_anatomy, stage_weight_files
from distributed.shard import Stage

HYBRID = {"PARALLEL": "tensor", "TENSOR_PARALLEL": "2"}
ARCHS = ("llama", "qwen3")  # a tied embedding (the last stage keeps half its rows) and an untied head


@pytest.mark.parametrize("arch", ARCHS)
def test_two_stages_of_two_ranks_match_mlx_lm_shard(tiny_models, arch):
    models = [tiny_models[a] for a in ARCHS]
    expected = shard_reference(2, "mpi", models, [{"text": PROMPT, "chat": False}], MAX_TOKENS)
    path = tiny_models[arch]
    # Chunks of 16 tokens: the prompt's prefill pipelines across the two stages.
    out = generate_json(4, "mpi", {"MODEL_REPO": str(path)} | HYBRID | CHUNKED,
                        ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS)])
    assert out["token_ids"] == expected[str(path)][0]
    assert out["parallel"]["mode"] == "hybrid" and out["parallel"]["tensor_parallel"] == 2
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    half = layers // 2
    ranks = out["ranks"]
    assert [r["layers"] for r in ranks] == [[0, half]] * 2 + [[half, layers]] * 2
    assert [r["shard"] for r in ranks] == [[0, 2], [1, 2]] * 2
    assert [r["parameter_bytes"] for r in ranks] == [
        expected_parameter_bytes(path, r["layers"], 2, first=r["rank"] < 2, last=r["rank"] >= 2) for r in ranks
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_hub_repo_gives_each_rank_only_its_stages_files(tiny_models, arch):
    """Each tiny model's first file holds layers 0-2 and the embedding, its second
    layers 3-5, the norm and any untied head. The last stage needs a tied embedding
    too, for its rows of the head."""
    index = json.loads((tiny_models[arch] / "model.safetensors.index.json").read_text())["weight_map"]
    anatomy = plan_anatomy(tiny_models[arch])
    first, second = sorted(set(index.values()))
    last = {first, second} if arch == "llama" else {second}
    for rank in range(4):
        stage = Stage(rank, 4, *((0, 3) if rank < 2 else (3, 6)), group_size=2)
        assert stage_weight_files(index, stage, anatomy) == ({first} if rank < 2 else last), rank


def test_mixture_of_experts_in_two_stages_of_two(tmp_path):
    from models.tiny import make_tiny_model

    path = make_tiny_model("qwen3_moe", tmp_path / "qwen3_moe")
    expected = shard_reference(2, "mpi", [path], [{"text": PROMPT, "chat": False}], MAX_TOKENS)
    out = generate_json(4, "mpi", {"MODEL_REPO": str(path)} | HYBRID | CHUNKED,
                        ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS)])
    assert out["token_ids"] == expected[str(path)][0]


def test_ngram_speculation_in_two_stages_of_two(tiny_models):
    """Verifications (several tokens a step) go around the stages like any step."""
    from test_speculation import NGRAM, PASSAGE

    settings = {"MODEL_REPO": str(tiny_models["llama"])} | HYBRID
    args = ["--prompt", PASSAGE, "--max-tokens", str(MAX_TOKENS)]
    plain = generate_json(4, "mpi", settings, args)
    speculated = generate_json(4, "mpi", settings | NGRAM, args)
    assert speculated["token_ids"] == plain["token_ids"]
    assert speculated["speculation"]["passes"] > 0


@pytest.mark.parametrize("ranks,backend,settings,message", [
    (4, "ring", HYBRID, "TENSOR_PARALLEL=2 needs a backend that splits the ranks into groups, such as MPI"),
    (2, "mpi", {"TENSOR_PARALLEL": "3"}, "TENSOR_PARALLEL=3 does not divide the 2 ranks into equal stages"),
    (2, "mpi", {"PARALLEL": "pipeline", "TENSOR_PARALLEL": "2"},
     "TENSOR_PARALLEL=2 splits layers among ranks, which PARALLEL=pipeline does not"),
], ids=["ring-backend", "uneven", "pipeline"])
def test_a_layout_that_cannot_run_is_a_clear_error(tiny_models, ranks, backend, settings, message):
    proc = run_ranks(ranks, backend, {"MODEL_REPO": str(tiny_models["llama"])} | settings,
                     ["--prompt", "hi", "--max-tokens", "2"])
    # mlx.launch itself exits 0 whatever its ranks do; it reports each one's code.
    failed = [f"rank {r} exited with code 2" in proc.stderr for r in range(ranks)] if backend == "ring" else []
    assert all(failed) if failed else proc.returncode != 0
    assert message in proc.stderr
