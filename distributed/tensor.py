"""Load a model for tensor parallelism: every rank holds 1/N of every layer, or with
TENSOR_PARALLEL=T, 1/T of every layer of its pipeline stage of T ranks.

mlx-lm's own `model.shard(group)` splits each layer's attention heads and MLP
columns (experts, for the mixture-of-experts models that define it) among the ranks
of the group, with mlx's all-to-sharded and sharded-to-all linear layers, so the
model's forward pass runs unchanged on every rank and its all-reduces give every rank
of the group the same hidden state. The parts around the layers (embedding, final
norm) stay whole on every rank that runs them; the output head is `TensorHead`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from distributed.anatomy import Anatomy, get_path, set_path
from distributed.loading import (
    anatomy_of, check_checkpoint, fetch_stage_weights, load_lazily, materialize, parameter_bytes,
)
from distributed.shard import NO_HOPS, Stage, head_alone, mark_stage, prune_to_stage, rows_of

log = logging.getLogger(__name__)

# Model dimensions that `model.shard` divides among the ranks (dense models).
SPLIT_DIMENSIONS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def shard_problem(model: nn.Module, ranks: int) -> Optional[str]:
    """Why `model` cannot be split among `ranks` ranks, or None if it can."""
    if not hasattr(model, "shard"):
        module = type(model).__module__.rpartition(".")[2]  # mlx-lm's name for the model type
        return f"mlx-lm's {module!r} model defines no shard() for tensor parallelism"
    args = getattr(model, "args", None)
    for name in SPLIT_DIMENSIONS:
        value = getattr(args, name, None)
        if isinstance(value, int) and value % ranks:
            return f"its {name} ({value}) does not divide among {ranks} ranks"
    return None


class TensorHead(nn.Module):
    """The output head of a tensor-parallel model, where its output is the logits
    (`Anatomy.head`), standing where the head was.

    A sampling step splits the head by vocabulary: each rank computes the logits of
    its rows and an all-gather joins them, so the head costs each rank 1/N (a fifth of
    a small model's work per token). For one sequence each part is the same bits as
    the whole head's rows; for a batch a BLAS may round them differently in the last
    bits, as it rounds a batch's rows differently from one row's (as for the
    pipeline's shared head). A step that does not sample (a prompt chunk) needs no
    logits, and every rank skips the head there. `shared` is set per step, before its
    graph is built. Other uses of the module (a tied embedding's lookup) call it as they would.
    """

    def __init__(self, module: nn.Module, anatomy: Anatomy, group: mx.distributed.Group, phases: set[str]):
        super().__init__()
        self.group = group
        self.rank = group.rank()
        self.method = anatomy.head.method
        self.vocab = anatomy.vocab
        self.chunk = -(-self.vocab // group.size())
        self.start = min(self.rank * self.chunk, self.vocab)
        self.stop = min(self.start + self.chunk, self.vocab)
        # A module this stage uses as the head alone (an untied lm_head; a tied
        # embedding on a last stage that is not also the first): every rank keeps just
        # its rows. `offset` is the vocabulary row this rank's copy begins at.
        self.offset = 0
        if head_alone(anatomy, phases):
            module = rows_of(module, self.start, self.stop)
            self.offset = self.start
        self.module = module
        self.shared = False

    def __call__(self, *args, **kwargs) -> mx.array:
        return self._use("__call__", args, kwargs)

    def __getattr__(self, key: str):
        if key == self.__dict__.get("method") and key != "__call__":
            return lambda *args, **kwargs: self._use(key, args, kwargs)
        return super().__getattr__(key)

    def _use(self, method: str, args: tuple, kwargs: dict) -> mx.array:
        if method != self.method:
            return getattr(self["module"], method)(*args, **kwargs)
        x = args[0]
        if self.shared:
            return self._gathered(x)
        return x  # no logits: the step's output is the caches (and, after rank 0, the last all-reduce's)

    def _gathered(self, x: mx.array) -> mx.array:
        """All the logits, from each rank's rows (padded to one width for the gather)."""
        mine = rows_of(self["module"], self.start - self.offset, self.stop - self.offset)
        part = getattr(mine, self.method)(x)
        if self.stop - self.start < self.chunk:
            pad = [(0, 0)] * (part.ndim - 1) + [(0, self.chunk - (self.stop - self.start))]
            part = mx.pad(part, pad)
        size = self.group.size()
        parts = mx.distributed.all_gather(part, group=self.group)  # rank by rank, along axis 0
        parts = parts.reshape(size, *part.shape)
        return mx.moveaxis(parts, 0, -2).reshape(*part.shape[:-1], size * self.chunk)[..., : self.vocab]


def tensor_head(model: nn.Module) -> Optional[TensorHead]:
    """The model's `TensorHead`; None where logits change after the head (every
    rank then computes them whole, as mlx-lm's own tensor parallelism does)."""
    return next((m for _, m in model.named_modules() if isinstance(m, TensorHead)), None)


def load_tensor(model: str, stage: Stage, group: mx.distributed.Group, path: Path,
                plan: Anatomy) -> tuple[nn.Module, dict]:
    """Build the model lazily, split it among `group` (this rank's stage) with its own
    shard(), cut it to the stage's layers, then read only this rank's part of each
    tensor it keeps (one layer at a time: a tensor is read whole, then sliced). `plan`,
    the anatomy from the config, picks a hub repo's files. ValueError if the checkpoint
    lacks a tensor."""
    if not Path(model).exists():
        fetch_stage_weights(model, path, stage, plan)
    net, config, loaded = load_lazily(path)
    anatomy = anatomy_of(net, config)
    check_checkpoint(net, anatomy, stage, loaded)
    net.shard(group)  # `choose_parallel` has checked that it splits among the group
    if anatomy.head is not None and stage.in_last_stage:
        set_path(net, anatomy.head.path, TensorHead(get_path(net, anatomy.head.path), anatomy, group, stage.phases))
    if stage.stages > 1:
        prune_to_stage(net, anatomy, stage, NO_HOPS)
    else:
        mark_stage(net, anatomy, stage)
    materialize(net, anatomy, stage)
    log.info("tensor shard ready: part %d of %d of each of layers %d-%d of %d, %.1f MB of parameters",
             stage.member + 1, stage.group_size, stage.start, stage.end - 1, anatomy.count,
             parameter_bytes(net) / 2**20)
    return net, config
