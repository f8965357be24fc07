"""Load a model for tensor parallelism: every rank holds 1/N of every layer.

mlx-lm's own `model.shard(group)` splits each layer's attention heads and MLP
columns among the ranks (mlx's all-to-sharded and sharded-to-all linear layers), so
the model's forward pass runs unchanged on every rank and its all-reduces give every
rank the same hidden state. The embedding and the final norm stay whole on every rank
(each needs any token's row). The output head is `TensorHead`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import load_model

from distributed.shard import Stage, architecture, materialize, parameter_bytes

log = logging.getLogger(__name__)

# Model dimensions that `model.shard` divides among the ranks (dense models).
SPLIT_DIMENSIONS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def shard_problem(model: nn.Module, ranks: int) -> Optional[str]:
    """Why `model` cannot be split among `ranks` ranks, or None if it can."""
    if not hasattr(model, "shard"):
        return f"mlx-lm's {architecture(model)!r} model defines no shard() for tensor parallelism"
    for name in SPLIT_DIMENSIONS:
        value = getattr(model.args, name, None)
        if isinstance(value, int) and value % ranks:
            return f"its {name} ({value}) does not divide among {ranks} ranks"
    return None


def fetch_all_weights(model: str) -> None:
    """For a hub repo, download every weight file: each rank holds part of every layer."""
    if Path(model).exists():
        return
    from huggingface_hub import snapshot_download

    snapshot_download(model, allow_patterns=["model*.safetensors"])


class TensorHead(nn.Module):
    """The output head (tied embedding or lm_head) of a tensor-parallel model.

    A step of one sequence splits the head by vocabulary: each rank computes the
    logits of its rows and an all-gather joins them, so the head costs each rank 1/N
    (a fifth of a small model's work per token). Each part is the same bits as the
    whole head's rows, as for the pipeline's shared head. A batch's logits come from
    rank 0's whole head alone, as a BLAS may round a split batch differently; the
    other ranks skip it. `shared` is set per step, before its graph is built. A tied
    head still embeds.
    """

    def __init__(self, model: nn.Module, world: mx.distributed.Group):
        super().__init__()
        self.world = world
        self.rank, size = world.rank(), world.size()
        self.tied = "lm_head" not in model
        head = model.model.embed_tokens if self.tied else model.lm_head
        self.vocab = head.weight.shape[0]
        self.chunk = -(-self.vocab // size)
        self.start = min(self.rank * self.chunk, self.vocab)
        self.stop = min(self.start + self.chunk, self.vocab)
        # An untied head is only a head: ranks after 0 keep just their rows. `offset`
        # is the vocabulary row where this rank's copy of the head begins.
        self.offset = 0
        if not self.tied and self.rank > 0:
            head = rows_of(head, self.start, self.stop)
            self.offset = self.start
        self.head = head
        self.shared = False

    def __call__(self, x: mx.array) -> mx.array:
        return self.head(x) if self.tied else self._forward(x)

    def as_linear(self, x: mx.array) -> mx.array:
        return self._forward(x)

    def _forward(self, x: mx.array) -> mx.array:
        if self.shared:
            return self._gathered(x)
        if self.rank > 0:
            return x  # the step's output here is the last all-reduce's
        return self._apply(self.head, x)

    def _gathered(self, x: mx.array) -> mx.array:
        """All the logits, from each rank's rows (padded to one width for the gather)."""
        part = self._apply(rows_of(self.head, self.start - self.offset, self.stop - self.offset), x)
        if self.stop - self.start < self.chunk:
            pad = [(0, 0)] * (part.ndim - 1) + [(0, self.chunk - (self.stop - self.start))]
            part = mx.pad(part, pad)
        size = self.world.size()
        parts = mx.distributed.all_gather(part, group=self.world)  # rank by rank, along axis 0
        parts = parts.reshape(size, *part.shape)
        return mx.moveaxis(parts, 0, -2).reshape(*part.shape[:-1], size * self.chunk)[..., : self.vocab]

    def _apply(self, head: nn.Module, x: mx.array) -> mx.array:
        return head.as_linear(x) if self.tied else head(x)


def rows_of(head: nn.Module, start: int, stop: int) -> nn.Module:
    """A copy of `head` (linear, embedding, or their quantized kinds) with only
    vocabulary rows [start, stop); its parameters are slices of the original's."""
    if (start, stop) == (0, head.weight.shape[0]):
        return head
    part = copy.copy(head)
    for name, value in head.parameters().items():
        part[name] = value[start:stop]
    return part


def install_head(model: nn.Module, world: mx.distributed.Group) -> TensorHead:
    head = TensorHead(model, world)
    if head.tied:
        model.model.embed_tokens = head
    else:
        model.lm_head = head
    return head


def tensor_head(model: nn.Module) -> TensorHead:
    return model.model.embed_tokens if "lm_head" not in model else model.lm_head


def load_tensor(model: str, world: mx.distributed.Group, path: Path) -> tuple[nn.Module, dict]:
    """Build the model lazily, split it with its own shard(), then read only this rank's
    part of each tensor (one layer at a time: a tensor is read whole, then sliced)."""
    fetch_all_weights(model)
    net, config = load_model(path, lazy=True, strict=True)
    problem = shard_problem(net, world.size())
    if problem is not None:
        raise ValueError(f"PARALLEL=tensor: {problem}; use PARALLEL=pipeline or auto")
    net.shard(world)
    install_head(net, world)
    stage = Stage(world.rank(), world.size(), 0, len(net.layers))
    materialize(net, stage)
    log.info("tensor shard ready: part %d of %d of each of %d layers, %.1f MB of parameters",
             world.rank() + 1, world.size(), len(net.layers), parameter_bytes(net) / 2**20)
    return net, config
