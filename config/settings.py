"""All mlx-ring settings, read from the environment and `.env` (environment wins)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_DIR = Path(__file__).resolve().parent.parent


class SettingsError(ValueError):
    """A setting has a bad value; the message names the variable."""


class Settings(BaseSettings):
    """Every variable is documented in `.env.example`."""

    model_config = SettingsConfigDict(
        env_file=os.environ.get("MLX_RING_ENV_FILE", REPO_DIR / ".env"),
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        protected_namespaces=(),
    )

    # Model
    model_repo: Optional[str] = None
    model_cache_dir: Path = Path.home() / ".cache" / "mlx-ring" / "models"

    # Generation
    default_max_tokens: int = Field(512, ge=1)
    max_sequence_length: int = Field(8192, ge=2)
    prefill_step_size: int = Field(2048, ge=1)

    # KV cache
    kv_cache_max_size: Optional[int] = Field(None, ge=8)
    kv_cache_reserved_memory_mb: int = Field(2048, ge=1)
    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    quantized_kv_start: int = Field(5000, ge=0)

    # Cluster
    backend: Literal["any", "ring", "mpi", "jaccl"] = "any"
    layer_split: str = "even"

    # Spool and API
    spool_dir: Path = REPO_DIR / "run" / "spool"
    poll_interval: float = Field(0.05, gt=0, le=5)
    spool_retention: float = Field(3600.0, ge=0)
    heartbeat_timeout: float = Field(10.0, gt=0)
    ring_down_after: float = Field(120.0, gt=0)
    api_host: str = "127.0.0.1"
    api_port: int = Field(8100, ge=1, le=65535)
    api_key: Optional[str] = None
    request_timeout: float = Field(600.0, gt=0)
    max_request_bytes: int = Field(1_048_576, ge=1024)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper() if isinstance(value, str) else value

    @field_validator("model_cache_dir", "spool_dir")
    @classmethod
    def _resolve_dir(cls, value: Path) -> Path:
        # Relative to the repo, so every process (and launch.sh) agrees on it.
        return (REPO_DIR / Path(value).expanduser()).resolve()

    @field_validator("kv_bits")
    @classmethod
    def _check_kv_bits(cls, value: Optional[int]) -> Optional[int]:
        if value not in (None, 4, 8):
            raise ValueError(f"must be empty (no quantization), 4 or 8; got {value}")
        return value

    @field_validator("kv_group_size")
    @classmethod
    def _check_group_size(cls, value: int) -> int:
        if value not in (32, 64, 128):
            raise ValueError(f"must be 32, 64 or 128; got {value}")
        return value

    @field_validator("layer_split")
    @classmethod
    def _check_split(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("even", "memory"):
            return value
        parts = value.split(",")
        if not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
            raise ValueError(
                "must be 'even', 'memory' or a comma-separated list of "
                f"layer counts, each >= 1 (such as '10,20'); got {value!r}"
            )
        return value


def load_settings(**overrides) -> Settings:
    """Read the settings, turning a validation error into one naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            name = str(e["loc"][0]).upper() if e["loc"] else "settings"
            lines.append(f"{name}={e.get('input')!r}: {e['msg']}")
        raise SettingsError("invalid setting: " + "; ".join(lines)) from None
