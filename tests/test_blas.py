"""FAST_BLAS: MLX really calls OpenBLAS when it is on, the reference BLAS when off, both
compute the same products, and ranks report the BLAS they use."""

from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest
from conftest import PROMPT, REPO, generate_json, rank_env
from models.tiny import make_tiny_model

from config.blas import find_openblas, use_blas
from launcher.status import rank_row

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="the BLAS choice is Linux-only")

# Chooses the BLAS from FAST_BLAS, prints it, saves a product of seeded random matrices.
PRODUCT = """
import sys
from config.blas import use_blas
print(use_blas())
import mlx.core as mx
import numpy as np
mx.random.seed(0)
a = mx.random.normal((8, 1024))
b = mx.random.normal((1024, 2816))
np.save(sys.argv[1], np.array(a @ b))
"""


def run_child(code: str, fast_blas: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=rank_env({"FAST_BLAS": fast_blas} | env), cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def sgemm_provider(ld_debug: str) -> str:
    """The library the dynamic linker bound libmlx.so's cblas_sgemm to (LD_DEBUG=bindings)."""
    for line in ld_debug.splitlines():
        if "libmlx.so" in line and "`cblas_sgemm'" in line:
            return line.split(" to ", 1)[1].split(" [", 1)[0]
    raise AssertionError("no binding of cblas_sgemm in the LD_DEBUG output")


def test_fast_blas_is_what_mlx_calls_and_agrees_with_reference(tmp_path):
    library = find_openblas()
    if library is None:
        pytest.skip("OpenBLAS is not installed (./launch.sh setup)")
    fast = run_child(PRODUCT, "1", str(tmp_path / "fast.npy"), LD_DEBUG="bindings")
    slow = run_child(PRODUCT, "0", str(tmp_path / "slow.npy"), LD_DEBUG="bindings")

    assert fast.stdout.split("\n")[0] == f"openblas {library}"
    assert slow.stdout.split("\n")[0] == "reference"
    assert "libopenblas" in sgemm_provider(fast.stderr)
    assert "mlx_cpu.libs/libblas" in sgemm_provider(slow.stderr)
    products = np.load(tmp_path / "fast.npy"), np.load(tmp_path / "slow.npy")
    np.testing.assert_allclose(*products, rtol=1e-4, atol=1e-3)


def test_missing_openblas_warns_and_keeps_reference():
    code = """
import ctypes.util
from pathlib import Path
import config.blas
config.blas.DEBIAN_OPENBLAS = Path("/nonexistent/libopenblas.so.0")
ctypes.util.find_library = lambda name: None
print(config.blas.use_blas())
"""
    proc = run_child(code, "1")
    assert proc.stdout.strip() == "reference"
    assert proc.stderr.count("./launch.sh setup") == 1


def test_rank_reports_the_blas_of_the_references(tmp_path):
    # Ranks get FAST_BLAS's default, as this process (conftest) chose for the references.
    path = make_tiny_model("llama", tmp_path / "llama", num_layers=2)
    out = generate_json(1, "any", {"MODEL_REPO": str(path)}, ["--prompt", PROMPT, "--max-tokens", "2"])
    assert out["ranks"][0]["blas"] == use_blas()
    if find_openblas() is not None:
        assert out["ranks"][0]["blas"].startswith("openblas ")


def test_status_shows_each_ranks_blas():
    ranks = [
        {"rank": 0, "pid": 11, "layers": [0, 3], "memory": 2**30, "host": "a", "blas": "openblas /x.so"},
        {"rank": 1, "pid": 12, "layers": [3, 6], "memory": 2**30, "host": "b", "blas": "reference"},
    ]
    rows = [rank_row(rank, "local", "yes").split() for rank in ranks]
    assert rows == [["0", "local", "a", "11", "0-2", "1.0GiB", "openblas", "whole", "yes"],
                    ["1", "local", "b", "12", "3-5", "1.0GiB", "reference", "whole", "yes"]]
