"""Speculative decoding (SPECULATION): output equals decoding without it, token for token.

Greedy output is compared with single-process mlx-lm without speculation; seeded
sampling with the same ring without speculation, as both draw each position with that
position's randomness. A tiny model quantized to 8 bits drafts for itself: its
proposals are often, not always, right. The default model copying a passage accepts most prompt-lookup
proposals and rejects some, so caches are trimmed on every rank along the way.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlx.core as mx
import pytest
from conftest import PROMPT, generate_json, reference_tokens, run_ranks
from mlx_lm.generate import generate_step
from harness import load_reference, metric_value, ring_and_api
from test_batching import _chat, _expected

from distributed.kv_cache import KVSettings, StageCache
from distributed.speculation import accepted_prefix, propose_ngram

PASSAGE = (
    "Repeat this passage exactly:\n\nThe harbour town woke slowly. Fishermen carried their nets down to "
    "the boats, gulls circled above the market, and the baker opened his shutters to let the smell of "
    "fresh bread drift along the quay."
)
MAX_TOKENS = 32
NGRAM = {"SPECULATION": "ngram", "NUM_DRAFT_TOKENS": "4"}


def _copying(default_model: Path, ranks: int, backend: str, settings: dict[str, str]) -> dict:
    args = ["--prompt", PASSAGE, "--chat", "--max-tokens", str(MAX_TOKENS)]
    return generate_json(ranks, backend, {"MODEL_REPO": str(default_model)} | settings, args)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    tokens = [5, 6, 7, 8, 1, 5, 6, 9, 2, 3, 5, 6]
    assert propose_ngram(tokens, 3) == [9, 2, 3]  # "5 6" last seen before 9, not before 7
    assert propose_ngram([1, 2, 3, 4, 2], 5) == [3, 4, 2]  # shorter n-grams when longer ones miss
    assert propose_ngram([1, 2, 3], 2) == []  # the last token never occurred before
    assert propose_ngram([4], 2) == []


def test_accepted_prefix_counts_leading_matches():
    assert accepted_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert accepted_prefix([1, 2, 3], [0, 2, 3, 5]) == 0
    assert accepted_prefix([1, 2], [1, 2, 7]) == 2


def test_a_trimmed_cache_equals_one_that_never_saw_the_rejected_tokens(tiny_models):
    """A verification step feeds the last token and proposals; trimming the rejected
    ones leaves the caches, and the next step's logits, as if only the kept were fed."""
    from mlx_lm import load

    model, _ = load(str(tiny_models["llama"]))
    layers = len(model.layers)
    prompt, kept, rejected = [3, 14, 15, 92, 65], [35, 89], [79, 32, 38]
    speculated = StageCache(model, 0, layers, KVSettings())
    model(mx.array([prompt]), cache=speculated.view())
    model(mx.array([kept + rejected]), cache=speculated.view())
    speculated.trim(len(rejected))
    plain = StageCache(model, 0, layers, KVSettings())
    model(mx.array([prompt]), cache=plain.view())
    model(mx.array([kept]), cache=plain.view())
    for mine, theirs in zip(speculated.local, plain.local):
        assert mine.offset == theirs.offset == len(prompt) + len(kept)
        for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
            assert mx.array_equal(a[..., : mine.offset, :], b[..., : theirs.offset, :]).item()
    after = [26, 43]
    assert mx.array_equal(model(mx.array([after]), cache=speculated.view()),
                          model(mx.array([after]), cache=plain.view())).item()


@pytest.mark.parametrize("ranks", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_ngram_greedy_output_equals_mlx_lm_without_speculation(default_model, ranks):
    expected = reference_tokens(default_model, PASSAGE, MAX_TOKENS, chat=True)
    out = _copying(default_model, ranks, "mpi", NGRAM)
    assert out["token_ids"] == expected
    spec = out["speculation"]
    # Proposals were accepted, and some rejected: caches were trimmed on every rank.
    assert 0 < spec["accepted_tokens"] < spec["proposed_tokens"]
    assert spec["tokens_per_pass"] > 1.5


@pytest.mark.slow
@pytest.mark.parametrize("ranks,backend", [(3, "mpi"), (2, "ring"), (3, "ring")])
def test_ngram_greedy_output_on_more_launches(default_model, ranks, backend):
    out = _copying(default_model, ranks, backend, NGRAM)
    assert out["token_ids"] == reference_tokens(default_model, PASSAGE, MAX_TOKENS, chat=True)
    assert out["speculation"]["accepted_tokens"] > 0


def test_ngram_in_tensor_mode_equals_tensor_mode_without_it(tiny_models):
    """(The default model's 9 heads do not split in two: a tiny model, whose proposals
    are mostly rejected.)"""
    settings = {"MODEL_REPO": str(tiny_models["llama"]), "PARALLEL": "tensor"}
    args = ["--prompt", PASSAGE, "--max-tokens", str(MAX_TOKENS)]
    plain = generate_json(2, "mpi", settings, args)
    speculated = generate_json(2, "mpi", settings | NGRAM, args)
    assert speculated["parallel"]["mode"] == "tensor"
    assert speculated["token_ids"] == plain["token_ids"]
    assert speculated["speculation"]["passes"] > 0


@pytest.fixture(scope="module")
def close_draft(tiny_models, tmp_path_factory) -> Path:
    """The tiny llama quantized to 8 bits: it proposes what the model would draw, often
    but not always."""
    from mlx_lm import convert

    path = tmp_path_factory.mktemp("drafts") / "llama-8bit"
    convert(str(tiny_models["llama"]), mlx_path=str(path), quantize=True, q_bits=8, q_group_size=32)
    return path


def _drafted(model: Path, draft: Path, ranks: int, backend: str = "mpi", *sampling: str) -> dict:
    settings = {"MODEL_REPO": str(model), "SPECULATION": "draft", "DRAFT_MODEL": str(draft)}
    return generate_json(ranks, backend, settings, ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS), *sampling])


@pytest.mark.parametrize("ranks", [1, 2])
def test_draft_model_greedy_output_equals_mlx_lm_without_speculation(tiny_models, close_draft, ranks):
    out = _drafted(tiny_models["llama"], close_draft, ranks)
    assert out["token_ids"] == reference_tokens(tiny_models["llama"], PROMPT, MAX_TOKENS)
    spec = out["speculation"]
    assert 0 < spec["accepted_tokens"] < spec["proposed_tokens"]


def test_a_model_drafting_for_itself_has_every_proposal_accepted(tiny_models):
    out = _drafted(tiny_models["qwen3"], tiny_models["qwen3"], 2)
    assert out["token_ids"] == reference_tokens(tiny_models["qwen3"], PROMPT, MAX_TOKENS)
    spec = out["speculation"]
    assert spec["acceptance_rate"] == 1.0
    assert spec["tokens_per_pass"] > 4  # NUM_DRAFT_TOKENS=4 and the step's own (the last pass may be short)
    # Rank 0 drafted each next pass while the ring verified the one before.
    assert spec["drafted_ahead"] == spec["passes"] - 1


def test_seeded_sampling_with_speculation_is_that_without_it(tiny_models, close_draft):
    """Each position is drawn with its own (seed, position) randomness from the same
    logits, a repetition penalty over the tokens before it: the kept tokens are the
    ones decoding without speculation draws."""
    sampling = ["--temperature", "0.7", "--seed", "11", "--repetition-penalty", "1.2"]
    first = _drafted(tiny_models["llama"], close_draft, 2, "mpi", *sampling)
    again = _drafted(tiny_models["llama"], close_draft, 2, "mpi", *sampling)
    args = ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS), *sampling]
    plain = generate_json(2, "mpi", {"MODEL_REPO": str(tiny_models["llama"])}, args)
    assert first["token_ids"] == again["token_ids"] == plain["token_ids"]
    assert first["token_ids"] != reference_tokens(tiny_models["llama"], PROMPT, MAX_TOKENS)  # not greedy
    assert first["speculation"]["accepted_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("ranks,backend", [(3, "mpi"), (2, "ring"), (3, "ring")])
def test_draft_model_greedy_output_on_more_launches(tiny_models, close_draft, ranks, backend):
    out = _drafted(tiny_models["llama"], close_draft, ranks, backend)
    assert out["token_ids"] == reference_tokens(tiny_models["llama"], PROMPT, MAX_TOKENS)
    assert out["speculation"]["accepted_tokens"] > 0


@pytest.mark.parametrize(
    "settings,ranks,named",
    [
        ({"SPECULATION": "draft"}, 1, "DRAFT_MODEL"),
        ({"SPECULATION": "sometimes"}, 1, "SPECULATION"),
        ({"SPECULATION": "ngram", "KV_CACHE_MAX_SIZE": "64"}, 1, "SPECULATION=ngram"),
        ({"SPECULATION": "draft", "DRAFT_MODEL": "default"}, 2, "has another tokenizer than the model"),
    ],
)
def test_speculation_that_cannot_run_is_a_clear_error(tiny_models, default_model, settings, ranks, named):
    if settings.get("DRAFT_MODEL") == "default":
        settings = settings | {"DRAFT_MODEL": str(default_model)}  # SmolLM2's tokenizer, not the tiny one's
    proc = run_ranks(ranks, "mpi", {"MODEL_REPO": str(tiny_models["llama"])} | settings, ["--prompt", "hi"],
                     timeout=120)
    assert proc.returncode != 0
    assert named in proc.stderr


def test_served_speculation_reports_its_figures_and_waits_while_others_decode(tiny_models, close_draft, tmp_path):
    """Usage counts the accepted proposals, /metrics and /health show rank 0's figures,
    and with two requests at once speculation waits, saying why; every answer is the
    greedy one."""
    model = tiny_models["llama"]
    settings = {"SPECULATION": "draft", "DRAFT_MODEL": str(close_draft), "PREFILL_STEP_SIZE": "16"}
    messages = [{"role": "user", "content": PROMPT}]
    with ring_and_api(model, tmp_path / "spool", **settings) as (api, _):
        alone = _chat(api, model, messages, 40)
        assert {k: alone[k] for k in ("text", "finish_reason")} == _expected(model, PROMPT, 40, 16)
        accepted = alone["usage"].completion_tokens_details.accepted_prediction_tokens
        assert 0 < accepted < alone["usage"].completion_tokens
        time.sleep(1.5)  # a heartbeat after the request
        record = httpx.get(f"{api.url}/health", timeout=10).json()["speculation"]
        assert record["mode"] == "draft" and record["paused"] is None
        assert record["accepted_tokens"] == accepted
        metrics = httpx.get(f"{api.url}/metrics", timeout=10).text
        assert metric_value(metrics, "mlx_ring_speculation_acceptance_rate") == pytest.approx(record["acceptance_rate"])
        assert metric_value(metrics, "mlx_ring_speculation_tokens_per_pass") == pytest.approx(record["tokens_per_pass"])
        assert metric_value(metrics, "mlx_ring_accepted_prediction_tokens_total") == accepted

        # Log-probabilities of rejected positions are dropped with them.
        reply = api.client().chat.completions.create(model=str(model), messages=messages, max_tokens=24,
                                                     temperature=0, logprobs=True, top_logprobs=2)
        assert reply.usage.completion_tokens_details.accepted_prediction_tokens > 0
        _, tokenizer = load_reference(model)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reference = []
        for token, logprobs in generate_step(mx.array(prompt), load_reference(model)[0], max_tokens=24):
            if token in tokenizer.eos_token_ids:
                break
            reference.append((token, logprobs))
        content = reply.choices[0].logprobs.content
        assert [c.token for c in content] == [tokenizer.decode([t]) for t, _ in reference]
        for item, (token, logprobs) in zip(content, reference):
            assert item.logprob == pytest.approx(logprobs[token].item(), abs=1e-4)

        pauses = []
        with ThreadPoolExecutor(2) as pool:
            both = [pool.submit(_chat, api, model, messages, 300, delay) for delay in (0, 0.2)]
            while not all(f.done() for f in both):
                beat = httpx.get(f"{api.url}/health", timeout=10).json()
                pauses.append((beat.get("speculation") or {}).get("paused"))
                time.sleep(0.2)
        assert "2 sequences active" in pauses
        for done in both:
            assert {k: done.result()[k] for k in ("text", "finish_reason")} == _expected(model, PROMPT, 300, 16)
