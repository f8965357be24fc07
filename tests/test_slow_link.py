"""PARALLEL=auto on a slow link: real ranks on the ring backend, every connection between
them through bench/slow_link.py's relay, which delays each chunk a few ms each way (like
Wi-Fi). There the pipeline must win; on MPI, for the same model, tensor parallelism.

The model is large enough that a layer's compute counts (a layer takes ms, not us):
split by tensor it would halve each token's compute, so only the link's cost can make
auto choose the pipeline.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, dump_stacks_and_kill, generate_json, rank_env

from bench.ring import free_port
from bench.slow_link import SlowLink, ring_hostfiles
from models.tiny import make_tiny_model

DELAY = 0.005  # seconds each way: 10 ms an all-reduce, 26 of them a token split by tensor
ARGS = ["--prompt", "hi", "--max-tokens", "2", "--json"]


@pytest.fixture(scope="module")
def layered_model(tmp_path_factory) -> Path:
    # About 40 MB of float32 weights a layer: a few ms of one core's compute each.
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("slow-link") / "qwen2", num_layers=4,
                           hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                           num_key_value_heads=2, head_dim=64)


def run_through_relays(settings: dict[str, str], directory: Path, delay: float, timeout: float = 120) -> dict:
    """server.py on 2 ring-backend ranks whose connections pass relays delaying `delay`
    s each way; the JSON rank 0 printed."""
    ports = [free_port(), free_port()]
    links = [SlowLink(("127.0.0.1", 0), ("127.0.0.1", port), delay) for port in ports]
    hostfiles = ring_hostfiles(ports, [link.address[1] for link in links], directory)
    env = rank_env({"BACKEND": "ring"} | settings)
    procs = [subprocess.Popen([PYTHON, str(REPO / "server.py"), *ARGS], cwd=REPO, text=True, start_new_session=True,
                              env=env | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfiles[rank])},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(2)]
    try:
        outputs = []
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=timeout))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the ranks were still running after {timeout} s:\n{dump_stacks_and_kill(proc)[-6000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
        for link in links:
            link.close()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def test_auto_picks_the_pipeline_over_a_slow_link(layered_model, tmp_path):
    out = run_through_relays({"MODEL_REPO": str(layered_model), "PARALLEL": "auto"}, tmp_path, DELAY)
    parallel = out["parallel"]
    assert parallel["requested"] == "auto" and parallel["mode"] == "pipeline", parallel
    # The relay's delay is in what auto measured: an all-reduce crosses it twice.
    assert parallel["all_reduce_us"] >= 2e6 * DELAY and parallel["ring_trip_us"] >= 2e6 * DELAY, parallel
    assert [r["layers"] for r in out["ranks"]] == [[0, 2], [2, 4]]


def test_auto_picks_tensor_for_the_same_model_on_mpi(layered_model):
    out = generate_json(2, "mpi", {"MODEL_REPO": str(layered_model), "PARALLEL": "auto"}, ARGS[:-1])
    parallel = out["parallel"]
    assert parallel["mode"] == "tensor", parallel
    assert parallel["ring_trip_us"] < 1e6 * DELAY, parallel
