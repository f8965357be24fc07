"""What the API tests share: the API under a real uvicorn, serving ranks as real
processes (`python server.py`, under MPI for several), and single-process mlx-lm's
greedy output to compare with."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import httpx
import mlx_lm
import openai
import pytest
import uvicorn
from conftest import launch_command, load_reference, rank_env
from mlx_lm.sample_utils import make_sampler

from config import REPO_DIR, Settings, load_settings
from http_api import create_app
from spool import Spool
from spool.protocol import SpoolRequest

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BYTES = 4096
MAX_SEQ = 256
RING_MAX_SEQ = 4096  # MAX_SEQUENCE_LENGTH of the real rank and its API: room for long generations


class ApiServer:
    """create_app(settings) under a real uvicorn in a thread, on a socket bound here."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(settings), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ApiServer":
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "API did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    @property
    def spool(self) -> Spool:
        return Spool(self.settings.spool_dir)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, **kwargs)

    def post(self, path: str, body: dict, timeout: float = 30) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers=AUTH, timeout=timeout)


def api_settings_for(model: Path, spool_dir: Path, **overrides) -> Settings:
    values = dict(model_repo=str(model), spool_dir=spool_dir, api_key=KEY, max_request_bytes=MAX_BYTES,
                  max_sequence_length=MAX_SEQ, default_max_tokens=16, request_timeout=5.0,
                  heartbeat_timeout=2.0, ring_down_after=30.0)
    return load_settings(**(values | overrides))


def error_body(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class RankProcess:
    """`python server.py` in serve mode (one rank, or `ranks` under MPI, or the BACKEND
    `settings` name); can be killed and started again."""

    def __init__(self, model: Path, spool_dir: Path, ranks: int = 1, **settings: str) -> None:
        self.spool = Spool(spool_dir)
        self.log_path = spool_dir.parent / "server.log"
        self.env = rank_env({"MODEL_REPO": str(model), "SPOOL_DIR": str(spool_dir), "BACKEND": "mpi",
                             "MAX_SEQUENCE_LENGTH": str(RING_MAX_SEQ), **settings})
        self.command = launch_command(ranks, self.env["BACKEND"], [])
        # mlx.launch leaves its ranks running when it is stopped: they get their own
        # process group, which `stop` signals as a whole (mpirun passes signals on itself).
        self.own_group = ranks > 1 and self.env["BACKEND"] != "mpi"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it and wait for a heartbeat saying ready written by this run."""
        started = time.time()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, cwd=REPO_DIR, env=self.env, stdout=log, stderr=log,
                                         start_new_session=self.own_group)

        def ready() -> bool:
            beat = self.spool.read_heartbeat() or {}
            return (beat.get("state") == "ready" and beat["time"] >= started) or self.proc.poll() is not None

        assert wait_for(ready, timeout=180) and self.proc.poll() is None, \
            f"server.py did not get ready:\n{self.log_path.read_text()[-3000:]}"

    def stop(self, kill: bool = False) -> None:
        if self.own_group:
            self._stop_group(signal.SIGKILL if kill else signal.SIGTERM)
            return
        self.proc.kill() if kill else self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _stop_group(self, sig: signal.Signals) -> None:
        """Signal the launcher and its ranks; SIGKILL what is left after 30 s."""
        def gone() -> bool:
            if self.proc.poll() is None:
                return False
            try:
                os.killpg(self.proc.pid, 0)
                return False
            except ProcessLookupError:
                return True

        os.killpg(self.proc.pid, sig)
        if not wait_for(gone, timeout=30):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def ring_settings_for(model: Path, spool_dir: Path, **overrides) -> Settings:
    return api_settings_for(model, spool_dir, **{"request_timeout": 120.0, "max_sequence_length": RING_MAX_SEQ}
                     | overrides)


@contextmanager
def ring_and_api(model: Path, spool_dir: Path, ranks: int = 1, api_settings: dict | None = None,
                 **settings: str) -> Iterator[tuple[ApiServer, RankProcess]]:
    """Serving ranks (`settings` are theirs) and the API (with `api_settings`) on one
    spool, both on `model`."""
    rank = RankProcess(model, spool_dir, ranks=ranks, **settings)
    with ApiServer(ring_settings_for(model, spool_dir, **(api_settings or {}))) as api:
        rank.start()
        try:
            yield api, rank
        finally:
            rank.stop()


@contextmanager
def tiny_api(model: Path, tmp_path_factory: pytest.TempPathFactory, **api_settings) -> Iterator[ApiServer]:
    """One rank on `model` and the API serving it under the name "tiny", on a fresh spool."""
    spool_dir = tmp_path_factory.mktemp("ring") / "spool"
    with ring_and_api(model, spool_dir, api_settings={"served_model_name": "tiny", **api_settings}) as (server, _):
        yield server


@dataclass
class Reference:
    """Greedy decoding in one process with plain mlx-lm."""

    token_ids: list[int]  # without the EOS token
    segments: list[str]  # the text mlx-lm's streaming detokenizer gives at each step
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(self.segments)


def mlx_lm_greedy(model_dir: Path, prompt: list[int] | list[dict], max_tokens: int) -> Reference:
    """`prompt` is token ids, or chat messages put through the chat template."""
    return _greedy(model_dir, json.dumps(prompt), max_tokens)


@lru_cache(maxsize=16)
def _greedy(model_dir: Path, prompt_json: str, max_tokens: int) -> Reference:
    prompt = json.loads(prompt_json)
    model, tokenizer = load_reference(model_dir)
    if isinstance(prompt[0], dict):
        prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    token_ids, segments, finish = [], [], None
    for response in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                           sampler=make_sampler(0.0)):
        if response.token not in tokenizer.eos_token_ids:
            token_ids.append(response.token)
        segments.append(response.text)
        finish = response.finish_reason
    return Reference(token_ids, segments, finish)


def spooled_request(api: ApiServer, request_id: str) -> SpoolRequest:
    """The request as the API queued it, from the spool file rank 0 finished."""
    done = api.settings.spool_dir / "done" / f"{request_id}.json"
    assert wait_for(done.exists), f"request {request_id} not in done/"
    return SpoolRequest.model_validate_json(done.read_bytes())


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
