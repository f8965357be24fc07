"""Load one pipeline stage: only this rank's layers, plus embedding or head where needed.

The model's own forward pass runs unchanged on every rank. Layers held by other
ranks become `SkippedLayer`s; the first local layer receives the hidden state
from the previous rank and the last local layer sends it to the next one. Parts
a stage does not own are replaced by parameter-free stand-ins, so they are never
read from disk.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model, load_tokenizer

log = logging.getLogger(__name__)

# Architectures (mlx-lm module names) whose forward pass is verified stage by stage.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3_text", "phi3")

# Files every stage needs from a hub repo before it knows its layers.
METADATA_PATTERNS = [
    "*.json",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]


@dataclass(frozen=True)
class Stage:
    """Where a rank sits in the pipeline: its layer range and ring neighbours."""

    rank: int
    size: int
    start: int
    end: int

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.size

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.size


class SkippedLayer(nn.Module):
    """A layer another rank holds: passes the hidden state through untouched."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        # Forward passes read flags such as `use_sliding` off each layer.
        for key, value in vars(layer).items():
            if not key.startswith("_") and isinstance(value, (bool, int, float, str)):
                setattr(self, key, value)

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        return x


class _LayerWrapper(nn.Module):
    """Runs a local layer; attribute reads fall through to it."""

    def __init__(self, layer: nn.Module, peer: int, world: mx.distributed.Group):
        super().__init__()
        self.layer = layer
        self.peer = peer
        self.world = world

    def __getattr__(self, key: str) -> Any:
        if key in self:
            return self[key]
        if "layer" not in self:
            raise AttributeError(key)
        return getattr(self["layer"], key)


class ReceiveHidden(_LayerWrapper):
    """First local layer of a later stage: its input comes from the previous rank."""

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        x = mx.distributed.recv_like(x, self.peer, group=self.world)
        return self.layer(x, *args, **kwargs)


class SendHidden(_LayerWrapper):
    """Last local layer of an earlier stage: its output goes to the next rank."""

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        x = self.layer(x, *args, **kwargs)
        # A plain attribute, not a parameter: the pipeline computes it before the
        # send, to ring the next rank's doorbell in between.
        object.__setattr__(self, "sending", x)
        return mx.distributed.send(x, self.peer, group=self.world)


class PlaceholderEmbedding(nn.Module):
    """Stands in for the embedding on later stages: only its output shape matters."""

    def __init__(self, hidden_size: int, dtype: mx.Dtype):
        super().__init__()
        self.hidden_size = hidden_size
        self.dtype = dtype

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.zeros((*ids.shape, self.hidden_size), dtype=self.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return x


class SharedHead(nn.Module):
    """The output head (tied embedding or lm_head) on a ring, where rank 0 and the
    last rank share it: with one sequence stepping, the ranks between would sit
    idle while the last one computed logits over the whole vocabulary, so rank 0
    computes the rows before `split` while the last rank computes the rest.

    In the model's forward pass it stands where the head was. On rank 0 it passes
    its input through (the model's output there is the send to the next rank). On
    the last rank it gives the logits of rows `first:` (set per step) and keeps its
    input, which rank 0 needs for the rows before `first`. A tied head still embeds.
    """

    def __init__(self, model: nn.Module, last: bool):
        super().__init__()
        self.tied = "lm_head" not in model
        self.head = model.model.embed_tokens if self.tied else model.lm_head
        self.last = last
        self.hidden_size = model.args.hidden_size
        self.vocab = self.head.weight.shape[0]
        self.split = self.vocab // 2
        self.first = 0
        # What rank 0 receives, known without evaluating anything.
        x = model.model.norm(model.model.embed_tokens(mx.array([[0]])))
        self.input_dtype = x.dtype
        self.logits_dtype = self.logits(x, 0, 1).dtype

    def __call__(self, x: mx.array) -> mx.array:
        return self.head(x) if self.tied else self._forward(x)

    def as_linear(self, x: mx.array) -> mx.array:
        return self._forward(x)

    def _forward(self, x: mx.array) -> mx.array:
        if not self.last:
            return x
        object.__setattr__(self, "hidden", x)
        return self.logits(x, self.first, self.vocab)

    def logits(self, x: mx.array, start: int, stop: int) -> mx.array:
        """Logits of vocabulary rows [start, stop): each row's are the same bits as
        the whole head's for one sequence."""
        head = self.head
        if (start, stop) != (0, self.vocab):
            head = copy.copy(head)
            for name, value in self.head.parameters().items():
                head[name] = value[start:stop]
        return head.as_linear(x) if self.tied else head(x)


def architecture(model: nn.Module) -> str:
    """The mlx-lm module name of a model, e.g. 'llama'."""
    return type(model).__module__.rsplit(".", 1)[-1]


def check_supported(model: nn.Module) -> None:
    arch = architecture(model)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {arch!r} is not supported for pipelining; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (mistral loads as llama)"
        )


def local_model_path(model: str) -> Path:
    """A local model directory, or the metadata files of a hub repo fetched into the HF cache."""
    path = Path(model)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=METADATA_PATTERNS))


def stage_weight_files(weight_map: dict[str, str], stage: Stage) -> set[str]:
    """The checkpoint files holding what `stage` keeps: its layers, the embedding
    on the first stage, the final norm and head (or tied embedding) on the last,
    and on a ring the head on the first stage too (see `SharedHead`)."""
    tied = not any(name.startswith("lm_head.") for name in weight_map)
    files = set()
    for name, file in weight_map.items():
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if match is not None:
            needed = stage.start <= int(match.group(1)) < stage.end
        elif "embed_tokens" in name:
            needed = stage.is_first or (stage.is_last and tied)
        elif name.startswith("lm_head."):
            needed = stage.is_first or stage.is_last
        else:
            needed = stage.is_last
        if needed:
            files.add(file)
    return files


def fetch_stage_weights(model: str, path: Path, stage: Stage) -> None:
    """For a hub repo, download only the weight files that hold this stage's layers."""
    if Path(model).exists():
        return
    from huggingface_hub import snapshot_download

    index_file = path / "model.safetensors.index.json"
    if not index_file.exists():
        snapshot_download(model, allow_patterns=["model*.safetensors"])
        return
    weight_map = json.loads(index_file.read_text())["weight_map"]
    files = stage_weight_files(weight_map, stage)
    log.info("downloading %d of %d weight files", len(files), len(set(weight_map.values())))
    snapshot_download(model, allow_patterns=sorted(files))


def count_layers(path: Path) -> int:
    """Number of decoder layers, read from a lazily built model skeleton."""
    model, _ = load_model(path, lazy=True, strict=False)
    check_supported(model)
    return len(model.layers)


def hidden_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype of hidden states: the embedding's output dtype, known without evaluating."""
    return model.model.embed_tokens(mx.array([[0]])).dtype


def prune_to_stage(model: nn.Module, stage: Stage, world: mx.distributed.Group) -> None:
    """Replace everything this stage does not run, and wire the ring hops."""
    inner = model.model
    layers = inner.layers
    for i in range(len(layers)):
        if not stage.start <= i < stage.end:
            layers[i] = SkippedLayer(layers[i])
    if not stage.is_first:
        layers[stage.start] = ReceiveHidden(layers[stage.start], stage.prev_rank, world)
    if not stage.is_last:
        last = stage.end - 1
        layers[last] = SendHidden(layers[last], stage.next_rank, world)

    tied = "lm_head" not in model
    hidden = PlaceholderEmbedding(model.args.hidden_size, hidden_dtype(model))
    head = None
    if stage.size > 1 and (stage.is_first or stage.is_last):
        head = SharedHead(model, stage.is_last)
    if not stage.is_last:
        inner.norm = nn.Identity()
    if tied:
        if head is not None:
            inner.embed_tokens = head
        elif not stage.is_first and not stage.is_last:
            inner.embed_tokens = hidden
    else:
        if head is not None:
            model.lm_head = head
        elif not stage.is_last:
            model.lm_head = nn.Identity()
        if not stage.is_first:
            inner.embed_tokens = hidden


def shared_head(model: nn.Module) -> Optional[SharedHead]:
    """The head rank 0 and the last rank share, on those two ranks of a ring."""
    for head in (model.get("lm_head"), model.model.embed_tokens):
        if isinstance(head, SharedHead):
            return head
    return None


def parameter_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def materialize(model: nn.Module, stage: Stage) -> None:
    """Read this stage's weights from disk, with a progress line every quarter."""
    local = list(range(stage.start, stage.end))
    marks = {local[len(local) * q // 4 - 1] for q in range(1, 5)}
    t0 = time.perf_counter()
    for i in local:
        mx.eval(model.model.layers[i].parameters())
        if i in marks:
            done = i - stage.start + 1
            log.info("loaded layer %d (%d/%d local layers, %.1fs)", i, done, len(local), time.perf_counter() - t0)
    mx.eval(model.parameters())


def load_stage(
    model: str, stage: Stage, world: mx.distributed.Group, path: Optional[Path] = None
) -> tuple[nn.Module, dict]:
    """Build the model skeleton lazily, cut it to `stage`, then read only what is left."""
    path = path or local_model_path(model)
    fetch_stage_weights(model, path, stage)
    net, config = load_model(path, lazy=True, strict=False)
    check_supported(net)
    prune_to_stage(net, stage, world)
    materialize(net, stage)
    log.info(
        "stage ready: layers %d-%d of %d, %.1f MB of parameters",
        stage.start,
        stage.end - 1,
        len(net.layers),
        parameter_bytes(net) / 2**20,
    )
    return net, config


def load_stage_tokenizer(path: Path, config: dict):
    """The tokenizer, with the EOS ids the model config declares."""
    return load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))



def local_layers(model: nn.Module, stage: Stage) -> list[nn.Module]:
    """This stage's own decoder layers, without the ring wrappers."""
    layers = []
    for layer in model.model.layers[stage.start : stage.end]:
        while isinstance(layer, _LayerWrapper):
            layer = layer["layer"]
        layers.append(layer)
    return layers
