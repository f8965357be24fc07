"""Batch lines yield to interactive requests in rank 0's scheduler: while batch lines
decode, an interactive prompt is prefilled and takes its first decode step on its own,
so the lines' rows never stand between a user and the first token. In process, a world
of one, on a real tiny model; every sequence's tokens equal mlx-lm's generate_step."""

from __future__ import annotations

import mlx.core as mx
from conftest import PROMPT, reference_tokens

from config import load_settings
from distributed.cluster import start_cluster
from spool.protocol import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
QUESTION = "Which bird follows the fishing boats home in the evening?"


def test_an_interactive_prompt_steps_alone_while_batch_lines_decode(tiny_models):
    path = tiny_models["qwen2"]
    settings = load_settings(_env_file=None, model_repo=str(path), prompt_cache_mb=0)
    cluster = start_cluster(settings, mx.distributed.init(strict=False, backend="ring"))
    scheduler, tokenizer = cluster.scheduler, cluster.tokenizer
    lines = [scheduler.submit(tokenizer.encode(PROMPT), GREEDY, 24, background=True) for _ in range(3)]
    drawn = {seq: [] for seq in lines}
    while any(not drawn[seq] for seq in lines):
        for result in scheduler.step():
            drawn[result.seq].append(result.token)
    assert scheduler.active == 3 and not scheduler.flights

    interactive = scheduler.submit(tokenizer.encode(QUESTION), GREEDY, 8)
    drawn[interactive] = []
    steps = []
    while not drawn[interactive]:
        steps.append(scheduler.step())
        for result in steps[-1]:
            drawn[result.seq].append(result.token)
    # Its first token came from a step of its own, and the lines drew nothing meanwhile.
    assert [result.seq for result in steps[-1]] == [interactive]
    assert all(result.seq == interactive for step in steps for result in step)

    while scheduler.busy:
        for result in scheduler.step():
            drawn[result.seq].append(result.token)
    assert drawn[interactive] == reference_tokens(path, QUESTION, 8)
    expected = reference_tokens(path, PROMPT, 24)
    assert all(drawn[seq] == expected for seq in lines)
