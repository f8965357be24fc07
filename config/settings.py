"""All mlx-ring settings, read from the environment and `.env` (environment wins)."""

from __future__ import annotations

import os
import sys
import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.hosts import Host, cluster_hosts, split_hosts

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
    # A GGUF's matrices as MLX 4-, 6- or 8-bit, or float16; unset: the bits nearest the file's
    gguf_quant: Optional[Literal["4", "6", "8", "float16"]] = None

    # Model names requests may use, comma-separated (the first is the one /v1/models lists
    # first); empty: MODEL_REPO as given, or the default model's name
    served_model_name: str = ""

    # Generation
    default_max_tokens: int = Field(512, ge=1)
    # Sampling defaults for requests that leave a field out; over the model's
    # generation_config.json, which is over OpenAI's defaults
    default_temperature: Optional[float] = Field(None, ge=0, le=2)
    default_top_p: Optional[float] = Field(None, gt=0, le=1)
    default_top_k: Optional[int] = Field(None, ge=0)
    default_min_p: Optional[float] = Field(None, ge=0, le=1)
    default_repetition_penalty: Optional[float] = Field(None, gt=0)
    max_sequence_length: int = Field(8192, ge=2)
    prefill_step_size: int = Field(2048, ge=1)
    # Where a prompt's chunks follow each other around a ring of several stages (the
    # pipeline, MICRO_BATCHES > 1): tokens per chunk, at most PREFILL_STEP_SIZE; 0: that
    pipeline_prefill_step_size: int = Field(256, ge=0)

    # Speculative decoding, for a sequence decoding alone: off; ngram: the tokens that
    # followed the latest earlier occurrence of the last few tokens (prompt lookup);
    # draft: DRAFT_MODEL's greedy continuation. NUM_DRAFT_TOKENS proposals a pass.
    speculation: Literal["off", "ngram", "draft"] = "off"
    num_draft_tokens: int = Field(4, ge=1, le=16)
    draft_model: Optional[str] = Field(None, validate_default=True)

    # KV cache
    kv_cache_max_size: Optional[int] = Field(None, ge=8)
    kv_cache_reserved_memory_mb: int = Field(2048, ge=1)
    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    quantized_kv_start: int = Field(5000, ge=0)
    prompt_cache_mb: int = Field(1024, ge=0)

    # Math library: on Linux, preload Debian's OpenBLAS over the mlx-cpu wheel's reference BLAS
    fast_blas: bool = True

    # Cluster
    backend: Literal["any", "ring", "mpi", "jaccl"] = "any"
    # pipeline: each rank holds whole layers; tensor: each holds 1/N of every layer;
    # auto: whichever a measurement of the link and the model at start says is faster
    parallel: Literal["pipeline", "tensor", "auto"] = "auto"
    # Pipeline stages of this many ranks each, tensor parallel within a stage; 0: unset
    tensor_parallel: int = Field(0, ge=0)
    layer_split: str = "even"
    micro_batches: int = Field(0, ge=0)

    # Spool and API
    spool_dir: Path = REPO_DIR / "run" / "spool"
    poll_interval: float = Field(0.05, gt=0, le=5)
    spool_retention: float = Field(3600.0, ge=0)
    heartbeat_timeout: float = Field(10.0, gt=0)
    ring_down_after: float = Field(120.0, gt=0)
    api_host: str = "127.0.0.1"
    api_port: int = Field(8100, ge=1, le=65535)
    api_key: Optional[str] = None
    # Browser origins allowed to call the API (CORS), comma-separated; "*" for any; empty: off
    cors_origins: str = ""
    request_timeout: float = Field(600.0, gt=0)
    max_request_bytes: int = Field(1_048_576, ge=1024)

    # Batches (OpenAI's Batch API): at most this many batch lines generate at once, so
    # interactive requests keep their time to first token; the largest batch input file
    batch_max_active: int = Field(4, ge=1)
    max_batch_file_mb: int = Field(100, ge=1)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Launch (read by the launcher, launcher/)
    ranks: int = Field(1, ge=1)
    hosts: str = ""
    hostfile: Optional[Path] = None
    ssh_user: Optional[str] = None
    remote_dir: str = str(REPO_DIR)
    ring_port: int = Field(32323, ge=1024, le=65535)
    start_timeout: int = Field(600, ge=1)
    stop_timeout: int = Field(30, ge=1)
    # The supervisor start leaves running (launcher/supervisor.py): restarts a ring whose
    # rank exited or whose rank 0 finished no step for STEP_TIMEOUT s, at most
    # RESTART_LIMIT times in 10 minutes; restarts the API when it exits
    supervise: bool = True
    step_timeout: float = Field(120.0, gt=0)
    restart_limit: int = Field(5, ge=0)
    log_dir: Path = REPO_DIR / "logs"
    run_dir: Path = REPO_DIR / "run"

    def cluster_hosts(self) -> list[Host]:
        """The hosts HOSTS or HOSTFILE name, in rank order; empty for this machine alone."""
        return cluster_hosts(self.hosts, self.hostfile, self.ssh_user)

    def sampling_defaults(self) -> dict:
        """DEFAULT_TEMPERATURE and the like, by SamplingParams' field names."""
        prefix = "default_"
        return {name[len(prefix):]: value for name, value in self if name.startswith(prefix)
                and name != "default_max_tokens" and value is not None}

    @staticmethod
    def split_list(value: str) -> list[str]:
        return [part.strip() for part in value.split(",") if part.strip()]

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper() if isinstance(value, str) else value

    @field_validator("parallel", "speculation", mode="before")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("model_cache_dir", "spool_dir", "log_dir", "run_dir", "hostfile")
    @classmethod
    def _resolve_path(cls, value: Optional[Path]) -> Optional[Path]:
        # Relative to the repo, so every process (and launch.sh) agrees on it.
        return None if value is None else (REPO_DIR / Path(value).expanduser()).resolve()

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: str) -> str:
        return ",".join(split_hosts(value))

    @field_validator("hostfile")
    @classmethod
    def _one_host_list(cls, value: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if value is not None and info.data.get("hosts"):
            raise ValueError("HOSTS is set too: use either HOSTS or HOSTFILE")
        return value

    @field_validator("ssh_user")
    @classmethod
    def _check_user(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError(f"must be a user name (letters, digits, '.', '-', '_'); got {value!r}")
        return value

    @field_validator("remote_dir")
    @classmethod
    def _check_remote_dir(cls, value: str) -> str:
        # A path on other machines: it cannot be resolved here, so it must be absolute.
        if not value.startswith("/"):
            raise ValueError(f"must be an absolute path (the repository on the hosts); got {value!r}")
        return value.rstrip("/") or "/"

    @field_validator("draft_model")
    @classmethod
    def _draft_needs_model(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if info.data.get("speculation") == "draft" and not value:
            raise ValueError("SPECULATION=draft needs DRAFT_MODEL (a hub id, local directory or GGUF file)")
        return value

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


def settings_or_exit() -> Settings:
    """For entry points: the settings, or exit 2 with the error naming the variable."""
    try:
        return load_settings()
    except SettingsError as err:
        print(f"mlx-ring: {err}", file=sys.stderr)
        raise SystemExit(2) from None
