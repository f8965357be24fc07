"""GGUF files the converter refuses before any work, and conversions that are stopped or race."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as QType
from gguf_synth import smollm_tokenizer_metadata, write_tiny_gguf

from models import resolve_model
from models.gguf_arch import ARCHITECTURES
from models.gguf_tensors import SUPPORTED_TYPES

REPO = Path(__file__).resolve().parent.parent
RESOLVE = (
    "import logging, sys; from pathlib import Path; logging.basicConfig(level=logging.INFO); "
    "from models import resolve_model; print(resolve_model(sys.argv[1], Path(sys.argv[2])))"
)


@pytest.fixture(scope="module")
def tokenizer_metadata() -> dict:
    return smollm_tokenizer_metadata(vocab=1024)


def refused(path: Path, cache: Path) -> str:
    with pytest.raises(ValueError) as err:
        resolve_model(str(path), cache)
    assert not cache.exists()  # refused before the cache was touched
    return str(err.value)


def test_unsupported_architecture(tmp_path: Path, tokenizer_metadata: dict) -> None:
    source = write_tiny_gguf(tmp_path / "mamba.gguf", "mamba", QType.F32, tokenizer_metadata)
    message = refused(source, tmp_path / "cache")
    assert "unsupported GGUF architecture 'mamba'" in message
    assert all(arch in message for arch in ARCHITECTURES)


def test_unsupported_tensor_type(tmp_path: Path, tokenizer_metadata: dict) -> None:
    source = write_tiny_gguf(tmp_path / "tq1.gguf", "llama", QType.TQ1_0, tokenizer_metadata)
    message = refused(source, tmp_path / "cache")
    assert "unsupported GGUF tensor type TQ1_0 (tensor 'token_embd.weight')" in message
    assert all(kind.name in message for kind in SUPPORTED_TYPES)


def test_unknown_tensor_type_id(tmp_path: Path, tokenizer_metadata: dict) -> None:
    source = write_tiny_gguf(tmp_path / "new.gguf", "llama", QType.F32, tokenizer_metadata)
    data = bytearray(source.read_bytes())
    name = b"blk.0.attn_q.weight"
    type_at = data.index(name) + len(name) + 4 + 2 * 8  # after n_dims and two dimensions
    data[type_at : type_at + 4] = (99).to_bytes(4, "little")
    source.write_bytes(data)
    message = refused(source, tmp_path / "cache")
    assert "unknown GGUF tensor type 99 (tensor 'blk.0.attn_q.weight')" in message
    assert "Q4_K" in message


def test_truncated_file(tmp_path: Path, tokenizer_metadata: dict) -> None:
    source = write_tiny_gguf(tmp_path / "cut.gguf", "qwen3", QType.Q4_K, tokenizer_metadata)
    data = source.read_bytes()
    source.write_bytes(data[: len(data) * 2 // 3])
    message = refused(source, tmp_path / "cache")
    assert "is truncated: tensor 'blk." in message and f"the file has {len(data) * 2 // 3} bytes" in message


def start_conversion(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """A conversion in another process, a few seconds long, once it has its work directory."""
    big = smollm_tokenizer_metadata(vocab=16384)
    source = write_tiny_gguf(tmp_path / "big.gguf", "llama", QType.Q4_K, big)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", RESOLVE, str(source), str(cache)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(cache.glob(".*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return proc, source, cache


def test_stopped_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    proc, _, cache = start_conversion(tmp_path)
    assert proc.poll() is None, "the conversion ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(cache.iterdir()) == []


def test_killed_conversion_is_cleaned_up_by_the_next(tmp_path: Path, caplog) -> None:
    proc, source, cache = start_conversion(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert [p.name.startswith(".") for p in cache.iterdir()] == [True]  # killed mid-way
    with caplog.at_level(logging.INFO, logger="models"):
        target = Path(resolve_model(str(source), cache))
    assert "left by a conversion that was stopped" in caplog.text
    assert list(cache.iterdir()) == [target]


def test_ranks_sharing_a_cache_convert_once(tmp_path: Path, tokenizer_metadata: dict) -> None:
    source = write_tiny_gguf(tmp_path / "shared.gguf", "llama", QType.Q4_K, tokenizer_metadata)
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", RESOLVE, str(source), str(cache)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1
    assert sum("INFO:models.source:converting" in err for _, err in outputs) == 1
    assert list(cache.iterdir()) == [Path(outputs[0][0].strip())]
