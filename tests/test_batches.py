"""OpenAI's Files and Batches APIs through the official openai client: the file routes and
a batch's validation with no rank at all, then batches on the real rank 0 (a tiny model):
answers checked against single-process mlx-lm, ring and API restarts mid-batch, cancel,
and an interactive request's time to first token while a batch runs."""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from harness import (
    AUTH, ApiServer, RankProcess, api_settings_for, metric_value, mlx_lm_greedy, ring_and_api, ring_settings_for,
    wait_for,
)

from conftest import rank_env
from config import REPO_DIR
from models.tiny import make_tiny_model
from spool import Spool
from spool.batches import line_request_id
from spool.protocol import Final, Requeued, SpoolRequest

BATCH_MAX_ACTIVE = 4
QUESTIONS = ["Tell me about the harbour.", "Name a colour.", "What is the weather like?", "Count to three."]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("model") / "llama")


def chat_line(custom_id: str, model: str, question: str, max_tokens: int) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": question}],
                     "max_tokens": max_tokens, "temperature": 0}}


def completion_line(custom_id: str, model: str, prompt: str, max_tokens: int) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}}


def jsonl(lines: list[dict | str]) -> bytes:
    """Lines as a batch input file; a str is written as it is (a malformed line)."""
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def upload(client: openai.OpenAI, data: bytes) -> str:
    return client.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch").id


def wait_batch(client: openai.OpenAI, batch_id: str, until, timeout: float = 120):
    """The batch once `until(batch)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.1)


def ended(batch) -> bool:
    return batch.status in ("completed", "failed", "cancelled", "expired")


def answered(batch) -> int:
    return batch.request_counts.completed + batch.request_counts.failed


def file_lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


# ---------------------------------------------------------------------------
# No rank: the spool's claim order, files, validation, cancel of a batch that never ran
# ---------------------------------------------------------------------------


def test_spool_claims_interactive_requests_before_batch_lines(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    request = SpoolRequest(kind="completion", model="m", prompt_tokens=[1], max_tokens=1, created=0)
    line = spool.submit(request.model_copy(update={"batch": "batch_x"}), "00000000000000000001-00000000000a")
    interactive = spool.submit(request)
    assert line < interactive and spool.known(line) and not spool.known("00000000000000000002-00000000000a")
    assert spool.claim()[0] == interactive  # the older batch line waits
    assert spool.claim(take_batch=False) is None  # rank 0 at its BATCH_MAX_ACTIVE
    assert spool.claim() == (line, request.model_copy(update={"batch": "batch_x"}))


@pytest.fixture(scope="module")
def front(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    settings = api_settings_for(tiny_model, tmp_path_factory.mktemp("front") / "spool", max_batch_file_mb=1)
    with ApiServer(settings) as server:
        yield server


def test_files_round_trip(front: ApiServer) -> None:
    client = front.client()
    data = jsonl([chat_line("a", "m", "hi", 4)])
    uploaded = client.files.create(file=("mine.jsonl", io.BytesIO(data)), purpose="batch")
    assert (uploaded.filename, uploaded.bytes, uploaded.purpose) == ("mine.jsonl", len(data), "batch")
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert client.files.content(uploaded.id).content == data
    assert uploaded.id in [f.id for f in client.files.list()]
    stored = front.settings.spool_dir / "files" / f"{uploaded.id}.data"
    assert stored.stat().st_mode & 0o777 == 0o600 and stored.parent.stat().st_mode & 0o777 == 0o700
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_files_refusals(front: ApiServer) -> None:
    client = front.client()
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="expires_after"):
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 3600})
    big = b"x" * (2**20 + 1)  # MAX_BATCH_FILE_MB is 1
    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=("big.jsonl", io.BytesIO(big)), purpose="batch")
    assert err.value.status_code == 413 and err.value.body["code"] == "file_too_large"
    # Ids that are no file's reach no path: the spool's own files stay out of reach.
    (front.settings.spool_dir / "files" / "secret.data").write_text("hidden-bytes")
    for bad in ("secret", "file-..", "..%2Fheartbeat.json", "file-" + "0" * 24):
        response = httpx.get(f"{front.url}/v1/files/{bad}/content", headers=AUTH)
        assert response.status_code == 404 and "hidden-bytes" not in response.text
    for bad in ("batch_" + "0" * 24, "batch_..", "secret"):
        with pytest.raises(openai.NotFoundError) as err:
            client.batches.retrieve(bad)
        assert err.value.body["code"] == "batch_not_found" and err.value.body["param"] == "batch_id"


def test_batch_validation_lists_bad_lines_and_fails_with_none_good(front: ApiServer, tiny_model: Path) -> None:
    client = front.client()
    model = str(tiny_model)
    bad_lines = ["{not json", json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions"}),
                 json.dumps(chat_line("y", "no-such-model", "hi", 4)),
                 json.dumps(completion_line("z", model, "hi", 4)),  # the batch is for chat completions
                 json.dumps(chat_line("s", model, "hi", 4) | {"body": {"model": model, "stream": True,
                                                                       "messages": [{"role": "user", "content": "hi"}]}}),
                 json.dumps(chat_line("n", model, "hi", 4) | {"body": {"model": model, "n": 2,
                                                                       "messages": [{"role": "user", "content": "hi"}]}})]
    batch = client.batches.create(input_file_id=upload(client, jsonl(bad_lines)), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert batch.status == "validating"
    batch = wait_batch(client, batch.id, ended, timeout=30)
    assert batch.status == "failed" and batch.failed_at
    errors = {e.line: (e.code, e.param) for e in batch.errors.data}
    assert errors == {1: ("invalid_json", None), 2: ("invalid_value", "body"), 3: ("model_not_found", "body.model"),
                      4: ("invalid_value", "url"), 5: ("invalid_value", "body.stream"), 6: ("invalid_value", "body.n")}
    with pytest.raises(openai.BadRequestError, match="output_expires_after"):
        client.batches.create(input_file_id=batch.input_file_id, endpoint="/v1/chat/completions",
                              completion_window="24h", output_expires_after={"anchor": "created_at", "seconds": 3600})
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-" + "1" * 24, endpoint="/v1/chat/completions",
                              completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_../../heartbeat")


def test_cancel_before_the_ring_runs_anything_and_pagination(front: ApiServer, tiny_model: Path,
                                                             tmp_path: Path) -> None:
    """No rank: the lines wait in the spool (`launch.sh status` shows the batches under
    way); cancelled, they are withdrawn, and the batch ends cancelled with nothing answered
    (its one bad line aside)."""
    client = front.client()
    lines = [chat_line(f"c{i}", str(tiny_model), "hi", 4) for i in range(6)] + ["oops"]
    file_id = upload(client, jsonl(lines))
    created = [client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                     completion_window="24h") for _ in range(3)]
    batch = wait_batch(client, created[-1].id, lambda b: b.status == "in_progress", timeout=30)
    assert batch.request_counts.total == 7 and batch.request_counts.failed == 1
    with pytest.raises(openai.BadRequestError, match="has not ended"):
        client.files.delete(file_id)
    status = subprocess.run([str(REPO_DIR / "launch.sh"), "status"], capture_output=True, text=True, timeout=120,
                            env=rank_env({"SPOOL_DIR": str(front.settings.spool_dir), "RUN_DIR": str(tmp_path)}))
    for made in created:
        assert f"batch {made.id}: in_progress, 1/7 lines answered (1 failed)" in status.stdout, status.stdout
    for made in created:
        assert client.batches.cancel(made.id).status == "cancelling"
    batch = wait_batch(client, created[-1].id, ended, timeout=30)
    assert batch.status == "cancelled" and batch.request_counts.completed == 0
    assert batch.output_file_id is None and len(file_lines(client, batch.error_file_id)) == 1
    assert client.batches.cancel(batch.id).status == "cancelled"
    failed = client.batches.create(input_file_id=upload(client, b"oops\n"), endpoint="/v1/chat/completions",
                                   completion_window="24h")
    wait_batch(client, failed.id, ended, timeout=30)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(failed.id)
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == [failed.id, created[-1].id] and page.has_more
    everything = [b.id for b in client.batches.list(limit=2)]  # the client follows `after`, 2 at a time
    assert everything[:4] == [failed.id, *reversed([b.id for b in created])]
    assert len(everything) == len(set(everything))


# ---------------------------------------------------------------------------
# On the real rank 0
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ring(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with ring_and_api(tiny_model, tmp_path_factory.mktemp("ring") / "spool",
                      api_settings={"batch_max_active": BATCH_MAX_ACTIVE},
                      BATCH_MAX_ACTIVE=str(BATCH_MAX_ACTIVE)) as (api, _):
        yield api


def batch_lines(url: str, batch_id: str) -> dict[str, float]:
    """A running batch's line counts by state, from /metrics (none before it starts or once it ended)."""
    metrics = httpx.get(f"{url}/metrics").text
    return {state: metric_value(metrics, f'mlx_ring_batch_lines{{batch="{batch_id}",state="{state}"}}')
            for state in ("total", "completed", "failed") if f'batch="{batch_id}",state="{state}"' in metrics}


def reference_text(model: Path, question: str, max_tokens: int) -> str:
    return mlx_lm_greedy(model, [{"role": "user", "content": question}], max_tokens).text


def check_answers(output: list[dict], model: Path, questions: dict[str, str], max_tokens: int) -> None:
    """Each output line is its custom_id's question answered as single-process mlx-lm does."""
    for line in output:
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        expected = reference_text(model, questions[line["custom_id"]], max_tokens)
        assert body["choices"][0]["message"]["content"] == expected, line["custom_id"]


def test_a_200_line_batch_completes_beside_a_completions_batch(ring: ApiServer, tiny_model: Path) -> None:
    client = ring.client()
    model = str(tiny_model)
    questions = {f"line-{i}": QUESTIONS[i % len(QUESTIONS)] for i in range(194)}
    lines: list[dict | str] = [chat_line(cid, model, q, 4) for cid, q in questions.items()]
    bad = {20: "{oops", 50: json.dumps(chat_line("line-0", model, "again", 4)),  # custom_id used already
           90: json.dumps(completion_line("bad-url", model, "hi", 4)),
           120: json.dumps(chat_line("bad-field", model, "hi", 4) | {"body": {"model": model, "frobnicate": 1,
                                                                          "messages": [{"role": "user",
                                                                                        "content": "hi"}]}}),
           150: json.dumps(chat_line("bad-max", model, "hi", 0)), 199: json.dumps({"custom_id": "no-body"})}
    for number in sorted(bad):
        lines.insert(number - 1, bad[number])
    assert len(lines) == 200
    chat = client.batches.create(input_file_id=upload(client, jsonl(lines)), endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"run": "test"})
    prompts = {f"text-{i}": f"The harbour number {i}" for i in range(20)}
    text = client.batches.create(input_file_id=upload(client, jsonl(
        [completion_line(cid, model, p, 3) for cid, p in prompts.items()])), endpoint="/v1/completions",
        completion_window="24h")
    running = wait_batch(client, chat.id, lambda b: b.status != "validating")
    assert running.status == "in_progress" and running.in_progress_at >= running.created_at
    # /metrics is live (the batch's record saves its counts once a second): the lines
    # counted there while it runs, and the batch gone from it once it ended.
    progress: dict[str, float] = {}

    def ten_done() -> bool:
        progress.update(batch_lines(ring.url, chat.id))
        return progress.get("completed", 0) >= 10

    assert wait_for(ten_done, timeout=120), progress
    assert progress["total"] == 200

    chat = wait_batch(client, chat.id, ended)
    text = wait_batch(client, text.id, ended)
    assert (chat.status, text.status) == ("completed", "completed") and chat.metadata == {"run": "test"}
    assert chat.request_counts.model_dump() == {"total": 200, "completed": 194, "failed": 6}
    assert {e.line: e.param for e in chat.errors.data} == {20: None, 50: "custom_id", 90: "url",
                                                           120: "body.frobnicate", 150: "body.max_tokens", 199: "method"}
    output = file_lines(client, chat.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(questions)
    check_answers(output, tiny_model, questions, 4)
    errors = file_lines(client, chat.error_file_id)
    assert sorted(str(line["custom_id"]) for line in errors) == sorted(
        ["None", "line-0", "bad-url", "bad-field", "bad-max", "no-body"])
    assert all(line["response"] is None and line["error"]["code"] for line in errors)
    assert client.files.retrieve(chat.output_file_id).purpose == "batch_output"

    completions = file_lines(client, text.output_file_id)
    assert sorted(line["custom_id"] for line in completions) == sorted(prompts)
    for line in completions:
        body = line["response"]["body"]
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] <= 3
    assert text.error_file_id is None
    # Batch lines alone never held more than BATCH_MAX_ACTIVE sequences.
    assert 1 <= ring.spool.read_heartbeat()["peak_active"] <= BATCH_MAX_ACTIVE
    assert f'batch="{chat.id}"' not in httpx.get(f"{ring.url}/metrics").text


def test_cancel_mid_batch_keeps_the_lines_done(ring: ApiServer, tiny_model: Path) -> None:
    client = ring.client()
    lines = 400  # far more than run before the cancel lands, however fast the ring
    questions = {f"c-{i}": QUESTIONS[i % len(QUESTIONS)] for i in range(lines)}
    batch = client.batches.create(input_file_id=upload(client, jsonl(
        [chat_line(cid, str(tiny_model), q, 24) for cid, q in questions.items()])),
        endpoint="/v1/chat/completions", completion_window="24h")
    wait_batch(client, batch.id, lambda b: b.request_counts.completed >= 8)
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch = wait_batch(client, batch.id, ended)
    assert batch.status == "cancelled" and batch.cancelled_at >= batch.cancelling_at
    output = file_lines(client, batch.output_file_id)
    assert 8 <= len(output) == batch.request_counts.completed < lines and batch.request_counts.failed == 0
    assert len({line["custom_id"] for line in output}) == len(output)
    check_answers(output, tiny_model, questions, 24)
    spool = ring.spool
    assert not any(spool.known(line_request_id(batch, n)) and not (ring.settings.spool_dir / "done" / f"{line_request_id(batch, n)}.json").exists()
                   for n in range(1, lines + 1))


def _ttft(client: openai.OpenAI, model: str) -> float:
    start = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a colour."}],
                                            max_tokens=4, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    stream.close()
    return first


def test_interactive_requests_go_first_while_a_batch_runs(ring: ApiServer, tiny_model: Path) -> None:
    client, model = ring.client(), str(tiny_model)
    idle = sorted(_ttft(client, model) for _ in range(5))[2]
    batch = client.batches.create(input_file_id=upload(client, jsonl(
        [chat_line(f"t-{i}", model, QUESTIONS[i % 4], 48) for i in range(80)])),
        endpoint="/v1/chat/completions", completion_window="24h")
    wait_batch(client, batch.id, lambda b: b.request_counts.completed >= 2)
    busy = sorted(_ttft(client, model) for _ in range(5))[2]
    still = client.batches.retrieve(batch.id)
    client.batches.cancel(batch.id)
    wait_batch(client, batch.id, ended)
    print(f"\ninteractive TTFT (median of 5): idle {idle * 1000:.1f} ms, while a batch runs {busy * 1000:.1f} ms "
          f"({busy / idle:.2f}x), BATCH_MAX_ACTIVE={BATCH_MAX_ACTIVE}")
    # The interactive requests did not wait for the batch: it was still running after them.
    assert still.status == "in_progress" and answered(still) < 80


def test_ring_and_api_restarts_mid_batch_answer_every_line_once(tiny_model: Path, tmp_path: Path) -> None:
    """Rank 0 killed twice and the API restarted once while a batch runs: every line is
    answered once, as single-process mlx-lm answers it, resumed lines included."""
    spool_dir = tmp_path / "spool"
    rank = RankProcess(tiny_model, spool_dir, BATCH_MAX_ACTIVE=str(BATCH_MAX_ACTIVE))
    settings = ring_settings_for(tiny_model, spool_dir, batch_max_active=BATCH_MAX_ACTIVE)
    api = ApiServer(settings).__enter__()
    questions = {f"r-{i}": QUESTIONS[i % len(QUESTIONS)] for i in range(120)}
    try:
        rank.start()
        client = api.client()
        batch = client.batches.create(input_file_id=upload(client, jsonl(
            [chat_line(cid, str(tiny_model), q, 16) for cid, q in questions.items()])),
            endpoint="/v1/chat/completions", completion_window="24h")
        wait_batch(client, batch.id, lambda b: answered(b) >= 15)
        rank.stop(kill=True)
        rank.start()
        wait_batch(client, batch.id, lambda b: answered(b) >= 40)
        api.__exit__()
        api = ApiServer(settings).__enter__()
        client = api.client()
        wait_batch(client, batch.id, lambda b: answered(b) >= 65)
        rank.stop(kill=True)
        rank.start()
        batch = wait_batch(client, batch.id, ended)
        output = file_lines(client, batch.output_file_id)
    finally:
        api.__exit__()
        rank.stop()
    assert batch.status == "completed" and batch.request_counts.model_dump() == {
        "total": 120, "completed": 120, "failed": 0}
    assert sorted(line["custom_id"] for line in output) == sorted(questions)
    check_answers(output, tiny_model, questions, 16)
    resumed = [n for n in range(1, 121) if any(isinstance(e, Requeued) for e in rank.spool.read_events(
        line_request_id(batch, n))[0])]
    assert resumed, "no line was in flight at a kill: the restart path did not run"
    finals = [sum(isinstance(e, Final) for e in rank.spool.read_events(line_request_id(batch, n))[0])
              for n in range(1, 121)]
    assert finals == [1] * 120
    print(f"\n{len(resumed)} lines resumed after a ring restart")
