"""Where a sequence ends: the scheduler's results carry the finish reason (an
end-of-sequence token, max_tokens), a stop string ends it where the text is made, and
rank 0's serving loop writes what it is told. In process, a world of one, on a real
tiny model; the tokens are compared with mlx-lm's own generate_step."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx_lm
from conftest import PROMPT, reference_tokens

from config import Settings, load_settings
from distributed.cluster import Cluster, start_cluster
from distributed.serving import Serving
from spool import Spool
from spool.protocol import Delta, SamplingParams, SpoolRequest

GREEDY = SamplingParams(temperature=0.0)


def _cluster(path: Path, **overrides) -> tuple[Cluster, Settings]:
    settings = load_settings(_env_file=None, model_repo=str(path), **overrides)
    return start_cluster(settings, mx.distributed.init(strict=False, backend="ring")), settings


def _first_new_token(tokens: list[int], after: int) -> int:
    """The position, past `after`, of a token not drawn before it: made the EOS token,
    it ends the sequence there and nowhere earlier."""
    return next(i for i, t in enumerate(tokens) if i > after and t not in tokens[:i])


def _text(path: Path, tokens: list[int]) -> tuple[list[str], str]:
    """mlx-lm's streaming detokenizer: the text at each token, and all of it once finalized."""
    detokenizer = mlx_lm.utils.load_tokenizer(path).detokenizer
    detokenizer.reset()
    segments = []
    for token in tokens:
        detokenizer.add_token(token)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    return segments, detokenizer.text


def test_results_carry_the_end_of_sequence_and_length_reasons(tiny_models):
    """Rank 0 starts the next step before the caller sees the last one's tokens, so the
    scheduler itself ends a sequence: at an end-of-sequence token ("stop"; the token is
    no part of the completion) or at its max_tokens-th token ("length")."""
    path = tiny_models["qwen2"]
    expected = reference_tokens(path, PROMPT, 8)
    eos = _first_new_token(expected, after=2)
    cluster, _ = _cluster(path)
    scheduler = cluster.scheduler
    scheduler.eos_token_ids = frozenset({expected[eos]})
    prompt = cluster.tokenizer.encode(PROMPT)
    to_eos = scheduler.submit(prompt, GREEDY, 8)
    to_length = scheduler.submit(prompt, GREEDY, eos - 1)
    drawn = {to_eos: [], to_length: []}
    while scheduler.busy:
        for result in scheduler.step():
            drawn[result.seq].append(result)
    assert [(r.token, r.finish_reason) for r in drawn[to_eos]] == (
        [(t, None) for t in expected[:eos]] + [(expected[eos], "stop")]
    )
    assert [r.in_completion for r in drawn[to_eos]] == [True] * eos + [False]
    assert [(r.token, r.finish_reason) for r in drawn[to_length]] == (
        [(t, None) for t in expected[: eos - 2]] + [(expected[eos - 2], "length")]
    )
    assert all(r.in_completion for r in drawn[to_length])
    assert not scheduler.sequences and scheduler.reserved == 0


def test_serving_writes_the_end_it_is_told(tiny_models, tmp_path):
    """Three requests together: one reaches a stop string, which the text stream finds
    and finishes on the ring at once; one reaches max_tokens; one draws an
    end-of-sequence token. Each final record has its reason, and its usage counts the
    tokens of the completion (the one completing the stop string included, the
    end-of-sequence token not)."""
    path = tiny_models["qwen2"]
    expected = reference_tokens(path, PROMPT, 16)
    segments, _ = _text(path, expected)
    # A stop string the output reaches with its sixth token, and not before.
    stop, before = segments[5], "".join(segments[:5])
    assert stop.strip() and "".join(segments).find(stop) == len(before), segments
    eos = _first_new_token(expected, after=5)
    cluster, settings = _cluster(path, spool_dir=tmp_path / "spool")
    cluster.scheduler.eos_token_ids = frozenset({expected[eos]})
    spool = Spool(settings.spool_dir)
    prompt = cluster.tokenizer.encode(PROMPT)

    def submit(max_tokens: int, stop: list[str]) -> str:
        request = SpoolRequest(kind="completion", model=str(path), prompt_tokens=prompt, max_tokens=max_tokens,
                               sampling=GREEDY, stop=stop, created=0)
        return spool.submit(request)

    ids = {"stop string": submit(16, [stop]), "length": submit(3, []), "eos": submit(16, [])}
    serving = Serving(cluster, settings, spool)
    serving.admit()
    stopped_seq = next(seq for seq, reply in serving.replies.items() if reply.request_id == ids["stop string"])
    drawn_for_stopped = 0
    while cluster.scheduler.busy:
        results = cluster.scheduler.step()
        drawn_for_stopped += sum(r.seq == stopped_seq for r in results)
        serving.write_out(results)
    assert not serving.replies

    finals = {}
    for name, request_id in ids.items():
        events, _ = spool.read_events(request_id)
        text = "".join(e.text for e in events if isinstance(e, Delta))
        final = events[-1]
        finals[name] = (text, final.finish_reason, final.stop_sequence, final.usage.completion_tokens)
    assert finals == {
        "stop string": (before, "stop", stop, 6),
        "length": (_text(path, expected[:3])[1], "length", None, 3),
        "eos": (_text(path, expected[:eos])[1], "stop", None, eos),
    }
    # The step built ahead on its sixth token rode along; its token was never handed out.
    assert drawn_for_stopped == 6
