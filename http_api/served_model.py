"""What the API knows about the model it serves: its names, its tokenizer, the width of
its logits, and the sampling defaults requests start from."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lm.utils import load_config, load_tokenizer

from config import Settings
from http_api.errors import APIError
from models import resolve_model, served_name, vocab_size
from spool.protocol import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    names: list[str]  # what requests may call it; the first is its id in replies and the spool
    tokenizer: Any
    vocab_size: int  # the width of the logits, which sampling fields are checked against
    defaults: SamplingParams

    @property
    def id(self) -> str:
        return self.names[0]

    def check_name(self, name: str) -> None:
        """404 unless requests may call the model `name`."""
        if name not in self.names:
            names = ", ".join(f"'{n}'" for n in self.names)
            raise APIError(404, f"The model '{name}' does not exist; this server serves {names}",
                           param="model", code="model_not_found")


def generation_config(model_path: Path) -> dict:
    """The model's recommended sampling (generation_config.json), by SamplingParams' names.
    `do_sample: false` asks for greedy decoding."""
    try:
        config = json.loads((model_path / "generation_config.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    picked = {name: config[name] for name in SamplingParams.model_fields if config.get(name) is not None}
    if config.get("do_sample") is False:
        picked["temperature"] = 0.0
    return picked


def load_served_model(settings: Settings) -> ServedModel:
    model_path = Path(resolve_model(settings.model_repo, settings.model_cache_dir, settings.gguf_quant))
    tokenizer = load_tokenizer(model_path)
    width = vocab_size(load_config(model_path)) or len(tokenizer.vocab)
    # The operator's settings over the model's recommendation, over OpenAI's defaults.
    defaults = SamplingParams.pick(generation_config(model_path), settings.sampling_defaults())
    names = Settings.split_list(settings.served_model_name) or [served_name(settings.model_repo)]
    log.info("serving %s (tokenizer from %s); sampling defaults %s", ", ".join(names), model_path,
             defaults.model_dump(exclude_none=True))
    return ServedModel(names, tokenizer, width, defaults)
