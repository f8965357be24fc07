"""Shared fixtures: tiny models, the default model, and launching real ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest

from config import Settings
from config.blas import use_blas

# References computed here must use the BLAS of the ranks they are compared with. Ranks
# started by run_ranks get no developer settings (rank_env), so FAST_BLAS's default; the
# choice has to come before MLX is first imported.
use_blas(Settings.model_fields["fast_blas"].default)

import mlx.core as mx  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
from bench.ring import mpi_command  # noqa: E402
from models.tiny import ARCHITECTURES, make_tiny_model  # noqa: E402

PYTHON = sys.executable
# mlx.launch without its busy I/O loop, as launch.sh runs it: the stock one spins a core,
# which ranks that busy-poll their collectives (tensor parallelism) need on 2 cores.
MLX_LAUNCH = [PYTHON, "-m", "launcher.mlx_launch"]

# A prompt longer than gemma3's 16-token window and two 16-token prefill chunks.
PROMPT = (
    "The old lighthouse keeper counted 27 ships before noon, then wrote a long "
    "letter to his sister about the weather, the gulls and the price of bread."
)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def default_model(model_cache) -> Path:
    """The embedded default model (SmolLM2-135M-Instruct), converted once per run."""
    from models import resolve_model

    return Path(resolve_model(None, model_cache))


SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def rank_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for ranks: no developer `.env`, the pipeline unless `extra` says
    otherwise (most tests compare it with one mlx-lm process; tensor parallelism's own
    tests compare with mlx-lm's), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTING_NAMES}
    env["MLX_RING_ENV_FILE"] = os.devnull
    env["PARALLEL"] = "pipeline"
    env.update(extra)
    return env


def launch_command(ranks: int, backend: str, args: list[str]) -> list[str]:
    """The command that starts `ranks` processes of server.py with `backend`."""
    server = [PYTHON, str(REPO / "server.py"), *args]
    if ranks == 1:
        return server
    if backend == "mpi":
        # Local MPI ranks inherit mpirun's environment.
        return mpi_command(ranks, *server)
    return [*MLX_LAUNCH, "-n", str(ranks), "--backend", backend, "--", *server]


def run_ranks(
    ranks: int, backend: str, settings: dict[str, str], args: list[str], timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run server.py on `ranks` real processes and wait for all of them."""
    return run_launch(launch_command(ranks, backend, args), rank_env({"BACKEND": backend} | settings), timeout)


def run_launch(command: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `command`, which starts server.py ranks, and wait for all of them; on timeout,
    fail with their output and stacks."""
    proc = subprocess.Popen(
        command,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        err = dump_stacks_and_kill(proc)
        pytest.fail(f"the ranks were still running after {timeout} s; their output and stacks:\n{err[-8000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def dump_stacks_and_kill(proc: subprocess.Popen) -> str:
    """Have every rank in `proc`'s session print its threads' stacks (server.py's
    SIGUSR1), then kill the whole session; returns what they wrote to stderr."""
    # Rank processes only: mlx.launch's and mpirun's command lines name server.py too.
    ranks = ["pgrep", "-s", str(proc.pid), "-f", r"^\S*python\S* \S*server\.py"]
    pids = subprocess.run(ranks, capture_output=True, text=True)
    for pid in pids.stdout.split():
        os.kill(int(pid), signal.SIGUSR1)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[1]


def generate_json(ranks: int, backend: str, settings: dict[str, str], args: list[str]) -> dict:
    """One-shot generation on the ring; the JSON rank 0 printed."""
    proc = run_ranks(ranks, backend, settings, [*args, "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_reference(path: Path | str):
    """mlx-lm's model and tokenizer of `path`, loaded once per test session."""
    return _load(str(path))


@lru_cache(maxsize=4)
def _load(path: str):
    from mlx_lm import load

    return load(path)


def reference_tokens(
    path: Path, prompt: str | list[int], max_tokens: int, chat: bool = False, **kwargs
) -> list[int]:
    """Single-process mlx-lm output (greedy unless a sampler is given), stopping at EOS.
    `prompt` is text (a user message with `chat`), or token ids."""
    from mlx_lm.generate import generate_step

    model, tokenizer = _load(str(path))
    if not isinstance(prompt, str):
        ids = prompt
    elif chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(prompt)
    out = []
    for token, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens, **kwargs):
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
    return out
