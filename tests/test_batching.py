"""Continuous batching, micro-batches in flight and the prompt cache, on real ranks.

Rank processes in serve mode (one rank, and two under MPI) behind the real API,
over real HTTP with the official openai client. Every reply is compared with
single-process mlx-lm running that request alone. One check runs in this process: what
a prompt-cache entry taken from a batch keeps in memory.
"""

from __future__ import annotations

import gc
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import mlx.core as mx
import mlx_lm
import pytest
from conftest import reference_tokens

from distributed.kv_cache import KVSettings, StageCache
from harness import ApiServer, metric_value, wait_for, ring_and_api
from models.tiny import make_tiny_model

PREFILL_STEP = 16  # several prefill chunks per prompt, interleaved with other sequences' steps
KV_BUDGET_MB = 2  # a handful of sequences at a time (see `_active_bound`)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("batching") / "llama")


@pytest.fixture(scope="module", params=[1, 2], ids=lambda n: f"{n}-ranks")
def serving(request, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, int]]:
    ranks = request.param
    spool_dir = tmp_path_factory.mktemp(f"batching-{ranks}") / "spool"
    with ring_and_api(model, spool_dir, ranks, PREFILL_STEP_SIZE=str(PREFILL_STEP), MICRO_BATCHES=str(ranks),
                      KV_CACHE_RESERVED_MEMORY_MB=str(KV_BUDGET_MB), PROMPT_CACHE_MB="1") as (api, _):
        assert _heartbeat(api)["micro_batches"] == ranks
        yield api, ranks


def _chat(api: ApiServer, model: Path, messages: list[dict], max_tokens: int, delay: float = 0.0,
          **extra) -> dict:
    """A streamed chat completion with the openai client: its text, finish reason and usage."""
    time.sleep(delay)
    stream = api.client(timeout=120).chat.completions.create(
        model=str(model), messages=messages, max_tokens=max_tokens, temperature=extra.pop("temperature", 0),
        stream=True, stream_options={"include_usage": True}, **extra)
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    return {"text": "".join(text), "finish_reason": finish, "usage": usage}


def _expected(model: Path, content: str, max_tokens: int, prefill_step: int = PREFILL_STEP) -> dict:
    """mlx-lm alone, greedy, with the same prefill chunks."""
    tokens = reference_tokens(model, content, max_tokens, chat=True, prefill_step_size=prefill_step)
    return {"text": _text(model, tokens), "finish_reason": "length" if len(tokens) == max_tokens else "stop"}


def _text(model: Path, tokens: list[int]) -> str:
    """Token ids as text, through mlx-lm's streaming detokenizer as the server does."""
    detokenizer = mlx_lm.utils.load_tokenizer(model).detokenizer
    detokenizer.reset()
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


def _heartbeat(api: ApiServer) -> dict:
    return api.spool.read_heartbeat() or {}


def _per_token(model: Path, ranks: int) -> int:
    """KV bytes a token takes on the rank holding the most layers: K and V of every
    layer, float32."""
    config = json.loads((model / "config.json").read_text())
    layers = -(-config["num_hidden_layers"] // ranks)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return layers * 2 * config["num_key_value_heads"] * head_dim * 4


def _active_bound(model: Path, ranks: int, reserved_per_sequence: int = 256) -> int:
    """Sequences that fit in KV_BUDGET_MB; each reserves whole 256-token cache allocations."""
    return KV_BUDGET_MB * 2**20 // _per_token(model, ranks) // reserved_per_sequence


# Different prompt lengths (1 to 5 prefill chunks) and lengths; each starts while others run.
JOINING = [
    ("Tell me about the harbour town of Wexley and its old fishing fleet.", 120, 0.0),
    ("Hi", 90, 0.05),
    ("List the ships: " + ", ".join(f"the {n}" for n in ("Gull", "Tern", "Osprey", "Heron", "Skua")), 60, 0.1),
    ("Why is the sea salty? " * 4, 100, 0.2),
    ("One word.", 7, 0.25),
    ("Describe a storm at night, the waves, the wind and the lights of the town.", 45, 0.4),
]


def _check_joining(api: ApiServer, model: Path) -> None:
    with ThreadPoolExecutor(len(JOINING)) as pool:
        futures = [pool.submit(_chat, api, model, [{"role": "user", "content": c}], n, d) for c, n, d in JOINING]
        replies = [f.result() for f in futures]
    for (content, max_tokens, _), reply in zip(JOINING, replies):
        expected = _expected(model, content, max_tokens)
        assert {"text": reply["text"], "finish_reason": reply["finish_reason"]} == expected, content
    assert wait_for(lambda: _heartbeat(api).get("peak_active", 0) >= 3)  # they ran together (a heartbeat a second)


def test_sequences_joining_at_different_times_match_alone(serving, model: Path) -> None:
    _check_joining(serving[0], model)


def test_sliding_window_sequences_joining_match_alone(tmp_path: Path) -> None:
    """gemma3 mixes sliding-window layers (rotating batch caches) with full ones; the
    prompts outgrow its 16-token window."""
    model = make_tiny_model("gemma3_text", tmp_path / "gemma3")
    with ring_and_api(model, tmp_path / "spool", 2, PREFILL_STEP_SIZE=str(PREFILL_STEP), MICRO_BATCHES="2") as (api, _):
        _check_joining(api, model)


def test_ranks_sharing_a_machine_take_turns_by_default(tmp_path: Path, model: Path) -> None:
    """Without MICRO_BATCHES, 2 ranks on this one machine step one micro-batch at a time,
    each computing on all cores in turn; the replies stay those of mlx-lm alone."""
    with ring_and_api(model, tmp_path / "spool", 2, PREFILL_STEP_SIZE=str(PREFILL_STEP)) as (api, _):
        assert _heartbeat(api)["micro_batches"] == 1
        _check_joining(api, model)


# Prompts of different lengths, all short enough to go through prefill in one padded chunk.
TOGETHER = ["Hi", "Name a colour.", "What is the capital of France, and why?", "Count to three."]


@pytest.mark.parametrize("arch,micro_batches", [("llama", 1), ("gemma3_text", 1), ("llama", 2)])
def test_prompts_queued_together_are_prefilled_together(tmp_path: Path, arch: str, micro_batches: int) -> None:
    """Prompts already waiting when the ring starts are prefilled together, right-padded to
    one length (PREPARE around 2 ranks): as one micro-batch, or with several micro-batches
    in flight, in even shares, so that they keep both stages busy; every reply still
    equals mlx-lm alone. gemma3's 16-token sliding window is shorter than most of the prompts."""
    model = make_tiny_model(arch, tmp_path / arch)
    step = 256  # one chunk holds them all
    with ring_and_api(model, tmp_path / "spool", 2, PREFILL_STEP_SIZE=str(step),
                      MICRO_BATCHES=str(micro_batches)) as (api, rank):
        rank.stop()
        with ThreadPoolExecutor(len(TOGETHER)) as pool:
            futures = [pool.submit(_chat, api, model, [{"role": "user", "content": c}], 30) for c in TOGETHER]
            assert wait_for(lambda: api.spool.queue_depth() == len(TOGETHER), timeout=30)
            rank.start()
            replies = [f.result() for f in futures]
            # Again, now from their cached prefixes (of different lengths) where there is a prompt cache.
            again = list(pool.map(lambda c: _chat(api, model, [{"role": "user", "content": c}], 30), TOGETHER))
        metrics = httpx.get(f"{api.url}/metrics").text
    for content, reply, second in zip(TOGETHER, replies, again):
        expected = _expected(model, content, 30, prefill_step=step)
        assert {"text": reply["text"], "finish_reason": reply["finish_reason"]} == expected, content
        assert {"text": second["text"], "finish_reason": second["finish_reason"]} == expected, content
    share = len(TOGETHER) // micro_batches
    assert rank.log_path.read_text().count(f"prefilling {share} prompts together") == micro_batches
    if arch == "llama":  # gemma3's window caches cannot be cut back to a prefix: no prompt cache
        assert metric_value(metrics, "mlx_ring_prompt_cache_hits_total") >= len(TOGETHER)


def test_seeded_sampling_in_a_batch_equals_alone(serving, model: Path) -> None:
    api, _ = serving
    messages = [{"role": "user", "content": "Name a colour."}]
    sampled = dict(temperature=0.9, top_p=0.95, seed=11)
    alone = _chat(api, model, messages, 32, **sampled)
    others = [[{"role": "user", "content": f"Count to {n}."}] for n in (3, 5, 7)]
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(_chat, api, model, m, 48) for m in others]
        together = pool.submit(_chat, api, model, messages, 32, 0.05, **sampled).result()
        [f.result() for f in busy]
    assert together["text"] == alone["text"]
    different = _chat(api, model, messages, 32, **(sampled | {"seed": 12}))
    assert different["text"] != alone["text"]


def test_prompt_cache_hit_equals_miss(serving, model: Path) -> None:
    api, ranks = serving
    tokenizer = mlx_lm.utils.load_tokenizer(model)
    before = httpx.get(f"{api.url}/metrics").text
    first = [{"role": "user", "content": f"Tell me a tale of {ranks} lighthouses on the northern coast."}]
    prompt1 = len(tokenizer.apply_chat_template(first, add_generation_prompt=True))
    turn1 = _chat(api, model, first, 24)
    # At most the chat template's opening, which earlier requests share, is cached.
    assert turn1["usage"].prompt_tokens_details.cached_tokens < prompt1 // 2
    # A second turn resends the conversation: everything up to the first reply is cached.
    second = first + [{"role": "assistant", "content": turn1["text"]},
                      {"role": "user", "content": "And the keeper?"}]
    turn2 = _chat(api, model, second, 24)
    assert turn2["usage"].prompt_tokens_details.cached_tokens >= prompt1
    prompt2 = tokenizer.apply_chat_template(second, add_generation_prompt=True)
    assert turn2["text"] == _text(model, reference_tokens(model, prompt2, 24, prefill_step_size=PREFILL_STEP))
    # The same request again: all but its last prompt token are cached, and the output is the same.
    again = _chat(api, model, first, 24)
    assert again["usage"].prompt_tokens_details.cached_tokens == prompt1 - 1
    assert again["text"] == turn1["text"]
    after = httpx.get(f"{api.url}/metrics").text
    cached = [r["usage"].prompt_tokens_details.cached_tokens for r in (turn1, turn2, again)]

    def grew(name: str) -> float:
        name = "mlx_ring_prompt_cache_" + name
        return metric_value(after, name) - metric_value(before, name)

    assert grew("hits_total") == sum(c > 0 for c in cached)
    assert grew("misses_total") == sum(c == 0 for c in cached)
    assert grew("reused_tokens_total") == sum(cached)
    assert metric_value(after, "mlx_ring_prompt_cache_tokens") > 0


def test_burst_of_32_stays_within_the_kv_bound(serving, model: Path) -> None:
    api, ranks = serving
    requests = [(f"Request {i}: write about ship number {i * 7}.", 12 + i % 9) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(_chat, api, model, [{"role": "user", "content": c}], n) for c, n in requests]
        replies = [f.result() for f in futures]
    for (content, max_tokens), reply in zip(requests, replies):
        assert {"text": reply["text"], "finish_reason": reply["finish_reason"]} == _expected(model, content, max_tokens)
    beat = _heartbeat(api)
    bound = _active_bound(model, ranks)
    assert beat["kv_capacity_bytes"] == KV_BUDGET_MB * 2**20
    assert max(r["kv_footprint"]["per_token"] for r in beat["ranks"]) == _per_token(model, ranks)
    assert 2 <= beat["peak_active"] <= bound
    assert wait_for(lambda: _heartbeat(api)["active"] == 0 and _heartbeat(api)["kv_reserved_bytes"] == 0)
    assert not list((api.settings.spool_dir / "incoming").iterdir())


def test_a_stored_batch_row_holds_only_its_own_tokens(model: Path) -> None:
    """The prompt cache keeps a leaving sequence's row of a batch cache. Once the batch is
    gone, the entry must hold that row's tokens only: a lazy slice kept the whole batch's
    arrays alive, and restoring it copied them (a first request after a batch of 8 took
    115 ms longer to its first token than the next one)."""
    net, _ = mlx_lm.load(str(model))
    layers = len(net.layers)
    baseline = mx.get_active_memory()
    caches = []
    for _ in range(8):
        cache = StageCache(net, 0, layers, KVSettings())
        for c in cache.local:
            keys = mx.random.normal((1, 4, 2000, 64))
            c.update_and_fetch(keys, keys)
        mx.eval(cache.state)
        caches.append(cache)
    batch = caches.pop(0)
    for cache in caches:
        batch.join(cache)
    mx.eval(batch.state)
    batch_bytes = batch.nbytes
    entry = batch.row(3)
    del batch, cache, caches
    gc.collect()
    entry_bytes = sum(c.nbytes for c in entry)
    assert entry_bytes * 8 <= batch_bytes
    assert mx.get_active_memory() - baseline < 2 * entry_bytes
