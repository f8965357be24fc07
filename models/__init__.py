"""Model sources: MODEL_REPO as a GGUF file, a local mlx-lm directory or a hub id."""

from models.source import DEFAULT_MODEL_NAME, resolve_model, served_name, vocab_size

__all__ = ["DEFAULT_MODEL_NAME", "resolve_model", "served_name", "vocab_size"]
