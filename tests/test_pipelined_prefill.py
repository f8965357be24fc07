"""Pipelined prefill on real ranks: a prompt's chunks follow each other around the ring
(several steps of one prompt in flight at once), and greedy output stays mlx-lm's,
run alone with prefill chunks of the same size, token for token.

Each case also checks, in rank 0's log, that the chunks did overlap ("at most 2 in
flight"), so that a scheduler sending them one at a time fails here.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
from conftest import PROMPT, load_reference, reference_tokens, run_ranks

from harness import ApiServer, RankProcess, ring_and_api, wait_for
from models.tiny import make_tiny_model

CHUNK = 16  # PIPELINE_PREFILL_STEP_SIZE: a prompt of a few hundred tokens makes many chunks
PIPELINED = {"MICRO_BATCHES": "2", "PREFILL_STEP_SIZE": "256", "PIPELINE_PREFILL_STEP_SIZE": str(CHUNK)}
LONG_PROMPT = " ".join([PROMPT] * 4)  # about 8 chunks
MAX_TOKENS = 24
PREFILLED = re.compile(r"batch \d+ prefilled: (\d+) prompt\(s\), (\d+) chunk\(s\) of up to (\d+) tokens, "
                       r"at most (\d+) in flight")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("pipelined-prefill") / "llama")


def _prefills(log: str) -> list[tuple[int, int, int, int]]:
    """Rank 0's record of each prefill: prompts, chunks, chunk size, most chunks in flight."""
    return [tuple(map(int, m.groups())) for m in PREFILLED.finditer(log)]


def _one_shot(model: Path, backend: str, settings: dict[str, str]) -> tuple[list[int], str]:
    proc = run_ranks(2, backend, {"MODEL_REPO": str(model), "LOG_LEVEL": "INFO", **settings},
                     ["--prompt", LONG_PROMPT, "--max-tokens", str(MAX_TOKENS), "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["token_ids"], proc.stderr


@pytest.mark.parametrize("backend", ["mpi", "ring"])
def test_a_long_prompts_chunks_pipeline_and_match_mlx_lm(model: Path, backend: str) -> None:
    ids, log = _one_shot(model, backend, PIPELINED)
    assert ids == reference_tokens(model, LONG_PROMPT, MAX_TOKENS, prefill_step_size=CHUNK)
    [(prompts, chunks, size, most)] = _prefills(log)
    assert (prompts, size, most) == (1, CHUNK, 2) and chunks >= 6, log[-3000:]


@pytest.mark.slow
def test_pipelined_equals_unpipelined(model: Path) -> None:
    """The same chunks one at a time (one step in flight) give the same ids."""
    alone, log = _one_shot(model, "mpi", {"MICRO_BATCHES": "1", "PREFILL_STEP_SIZE": str(CHUNK)})
    assert [most for *_, most in _prefills(log)] == [1]
    assert _one_shot(model, "mpi", PIPELINED)[0] == alone


@pytest.fixture(scope="module", params=["mpi", pytest.param("ring", marks=pytest.mark.slow)])
def serving(request, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, RankProcess]]:
    spool_dir = tmp_path_factory.mktemp(f"pipelined-{request.param}") / "spool"
    with ring_and_api(model, spool_dir, 2, api_settings={"max_request_bytes": 2**16}, BACKEND=request.param,
                      **PIPELINED) as served:
        yield served


def _greedy_chat(api: ApiServer, model: Path, content: str) -> tuple[str, str]:
    """A greedy chat completion's text and finish reason."""
    reply = api.client(timeout=120).chat.completions.create(
        model=str(model), messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS, temperature=0)
    return reply.choices[0].message.content, reply.choices[0].finish_reason


def _expected(model: Path, content: str) -> tuple[str, str]:
    """mlx-lm alone, greedy, in prefill chunks of CHUNK tokens; its text through mlx-lm's
    streaming detokenizer, as the ring's."""
    tokens = reference_tokens(model, content, MAX_TOKENS, chat=True, prefill_step_size=CHUNK)
    detokenizer = load_reference(model)[1].detokenizer
    detokenizer.reset()
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text, "length" if len(tokens) == MAX_TOKENS else "stop"


def test_a_request_arriving_mid_prefill(serving, model: Path) -> None:
    """A second prompt submitted while a long one's chunks are going around waits its
    turn (first come, first served) and both replies are mlx-lm's."""
    api, rank = serving
    long = " ".join([PROMPT] * 40)  # about 80 chunks
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_greedy_chat, api, model, long)
        assert wait_for(lambda: any((api.settings.spool_dir / "claimed").iterdir()), timeout=30)
        second = pool.submit(_greedy_chat, api, model, "Hi there, who are you?")
        replies = first.result(), second.result()
    assert replies == (_expected(model, long), _expected(model, "Hi there, who are you?"))
    assert any(chunks >= 60 and most == 2 for _, chunks, _, most in _prefills(rank.log_path.read_text()))


# Short prompts (with the chat template, 20 to 60 tokens), 2 rows of a 16-token chunk
# fitting in PREFILL_STEP_SIZE many times over.
TOGETHER = ["Hi", "Name a colour.", "What is the capital of France, and why? " * 3, "Count to three."]


def test_prompts_queued_together_prefill_in_even_shares(serving, model: Path) -> None:
    """With 2 micro-batches in flight, 4 prompts queued together prefill as 2 padded
    micro-batches of 2, which then decode side by side, each on a stage while the
    other is on the next; every reply equals mlx-lm alone."""
    api, rank = serving
    rank.stop()
    with ThreadPoolExecutor(len(TOGETHER)) as pool:
        futures = [pool.submit(_greedy_chat, api, model, content) for content in TOGETHER]
        assert wait_for(lambda: api.spool.queue_depth() == len(TOGETHER), timeout=30)
        before = len(rank.log_path.read_text())
        rank.start()
        replies = [f.result() for f in futures]
    assert replies == [_expected(model, content) for content in TOGETHER]
    prefills = _prefills(rank.log_path.read_text()[before:])
    assert [prompts for prompts, *_ in prefills] == [2, 2]
    assert max(chunks for _, chunks, _, _ in prefills) >= 3
