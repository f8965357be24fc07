"""One pipeline stage of any mlx-lm decoder: its layers, the ring hops, stand-ins for the rest.

The model's own forward pass runs unchanged on every rank (see `distributed.anatomy`
for how its parts are found). Layers held by other ranks become `SkippedLayer`s; the
first local layer receives the hidden state from the previous rank and the last local
layer sends it to the next one. Parts a stage does not run (the embedding past rank 0,
the final norm and head before the last rank) become parameter-free stand-ins, so
their weights are never read from disk.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from distributed.anatomy import AFTER, BEFORE, Anatomy, Use, get_path, hidden_argument, set_path
from distributed.kv_cache import Shadow


@dataclass(frozen=True)
class Stage:
    """Where a rank sits: its layer range, its ring neighbours and its pipeline stage.

    With TENSOR_PARALLEL=T (`group_size`), consecutive ranks form stages of T that each
    hold 1/T of the stage's layers: the stage's last rank hands its hidden state to the
    next stage's first, its ring neighbour, which shares it with the rest of its stage.
    A pipeline has stages of one rank, tensor mode one stage of all."""

    rank: int
    size: int
    start: int
    end: int
    group_size: int = 1

    @property
    def is_first(self) -> bool:
        """Rank 0, which schedules and samples."""
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        """The ring's last rank, which sends a step's results to rank 0."""
        return self.rank == self.size - 1

    @property
    def stages(self) -> int:
        return self.size // self.group_size

    @property
    def index(self) -> int:
        """This rank's stage, in pipeline order."""
        return self.rank // self.group_size

    @property
    def member(self) -> int:
        """This rank's place in its stage (its part of each layer)."""
        return self.rank % self.group_size

    @property
    def in_first_stage(self) -> bool:
        return self.index == 0

    @property
    def in_last_stage(self) -> bool:
        return self.index == self.stages - 1

    @property
    def receives(self) -> bool:
        """Whether this rank receives its stage's input from the previous rank."""
        return not self.in_first_stage and self.member == 0

    @property
    def wakes_next(self) -> bool:
        """Whether this rank, woken for a step's input (a later stage's ranks before
        its last), wakes the next rank of its stage in turn, which would otherwise
        wait for the input in the all-reduce that shares it, busy-polling a core."""
        return not self.in_first_stage and self.member < self.group_size - 1

    @property
    def sends_hidden(self) -> bool:
        """Whether this rank sends its stage's output to the next rank."""
        return not self.in_last_stage and self.member == self.group_size - 1

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.size

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.size

    @property
    def phases(self) -> set[str]:
        """What this stage runs besides its layers: the parts before them on the first
        stage, those after them on the last."""
        return {phase for phase, runs in ((BEFORE, self.in_first_stage), (AFTER, self.in_last_stage)) if runs}


@dataclass(frozen=True)
class Hops:
    """How a hidden state crosses to the ring neighbours: `receive(like)` gives the
    previous rank's array shaped like `like`, `send(x)` gives `x`'s send."""

    receive: Callable[[mx.array], mx.array]
    send: Callable[[mx.array], mx.array]


def ring_hops(stage: Stage, world: mx.distributed.Group, group: mx.distributed.Group) -> Hops:
    """MLX point-to-point to the ring neighbours, which MLX's ring backend requires.
    Within stages of several ranks (`group`, this rank's stage), only the stage's ends
    hop; the first rank's input reaches the others by an all-reduce (theirs are zeros)."""
    if stage.group_size == 1:
        return Hops(
            lambda like: mx.distributed.recv_like(like, stage.prev_rank, group=world),
            lambda x: mx.distributed.send(x, stage.next_rank, group=world),
        )

    def receive(like: mx.array) -> mx.array:
        own = mx.distributed.recv_like(like, stage.prev_rank, group=world) if stage.receives else mx.zeros_like(like)
        return mx.distributed.all_sum(own, group=group)

    def send(x: mx.array) -> mx.array:
        return mx.distributed.send(x, stage.next_rank, group=world) if stage.sends_hidden else x

    return Hops(receive, send)


# No ring: a stage computes on its own input, for checks at start that evaluate it.
NO_HOPS = Hops(lambda like: like, lambda x: x)


def _hidden(args: tuple, kwargs: dict) -> mx.array:
    key = hidden_argument(args, kwargs)
    return args[0] if key == 0 else kwargs[key]


def _with_hidden(args: tuple, kwargs: dict, x: mx.array) -> tuple[tuple, dict]:
    key = hidden_argument(args, kwargs)
    return ((x, *args[1:]), kwargs) if key == 0 else (args, kwargs | {key: x})


class _Shell(nn.Module):
    """A parameter-free copy of a module's plain attributes and children, with its
    class's properties: forward passes and `make_cache` read flags such as
    `use_sliding`, `self_attn.is_local` or a property `is_sliding` off layers they skip."""

    def __init__(self, module: nn.Module):
        super().__init__()
        object.__setattr__(self, "_of", type(module))
        for key, value in vars(module).items():
            if not key.startswith("_"):
                object.__setattr__(self, key, value)
        for key, child in module.items():
            if isinstance(child, nn.Module):
                self[key] = _Shell(child)
            elif isinstance(child, list) and all(isinstance(c, nn.Module) for c in child):
                self[key] = [_Shell(c) for c in child]

    @property
    def __class__(self):  # model code picks masks by layer type (olmo_hybrid)
        return object.__getattribute__(self, "_of")

    def __getattr__(self, key: str) -> Any:
        found = getattr(object.__getattribute__(self, "_of"), key, None)
        if isinstance(found, property):
            return found.fget(self)
        return super().__getattr__(key)


class SkippedLayer(_Shell):
    """A layer another rank holds: passes the hidden state through untouched, and
    keeps a stand-in cache of its kind in step (see `Shadow`)."""

    def __call__(self, *args, **kwargs) -> mx.array:
        x = _hidden(args, kwargs)
        for value in (*args, *kwargs.values()):
            if isinstance(value, Shadow):
                value.advance(x)
        return x


class _LayerWrapper(nn.Module):
    """Runs a local layer; attribute reads fall through to it."""

    def __init__(self, layer: nn.Module, hops: Hops):
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "hops", hops)

    @property
    def __class__(self):  # model code picks masks by layer type (olmo_hybrid)
        return self["layer"].__class__

    def __getattr__(self, key: str) -> Any:
        if key in self:
            return self[key]
        if "layer" not in self:
            raise AttributeError(key)
        return getattr(self["layer"], key)


class ReceiveHidden(_LayerWrapper):
    """First local layer of a later stage: its input comes from the previous rank."""

    def __call__(self, *args, **kwargs) -> mx.array:
        args, kwargs = _with_hidden(args, kwargs, self.hops.receive(_hidden(args, kwargs)))
        return self.layer(*args, **kwargs)


class SendHidden(_LayerWrapper):
    """Last local layer of an earlier stage: its output goes to the next rank."""

    def __call__(self, *args, **kwargs) -> mx.array:
        x = self.layer(*args, **kwargs)
        # A plain attribute, not a parameter: the pipeline computes it before the
        # send, to ring the next rank's doorbell in between.
        object.__setattr__(self, "sending", x)
        return self.hops.send(x)


class StagePart(nn.Module):
    """A part (embedding, norm, head) on a stage that runs only some of its uses. A use
    the stage runs calls the module; one before the layers that it doesn't gives zeros
    of the output's shape (a later rank receives the hidden state instead); one after
    them passes its input through (an earlier rank's output is its send)."""

    def __init__(self, module: Optional[nn.Module], uses: tuple[Use, ...], phases: set[str]):
        super().__init__()
        if module is not None:
            self.module = module
        object.__setattr__(self, "_uses", {use.method: use for use in uses})
        object.__setattr__(self, "_phases", phases)

    def __call__(self, *args, **kwargs) -> mx.array:
        return self._use("__call__", args, kwargs)

    def __getattr__(self, key: str) -> Any:
        uses = object.__getattribute__(self, "_uses")
        if key in uses:
            return lambda *args, **kwargs: self._use(key, args, kwargs)
        return super().__getattr__(key)

    def _use(self, method: str, args: tuple, kwargs: dict) -> mx.array:
        use = self._uses.get(method)
        if use is None or use.phase in self._phases:
            return getattr(self["module"], method)(*args, **kwargs)
        x = args[0]
        if use.phase == BEFORE:
            return mx.zeros((*x.shape[: use.lead], *use.trailing), dtype=use.dtype)
        return x


class SharedHead(StagePart):
    """The output head on a ring, where rank 0 and the last rank share it: the ranks
    between would sit idle while the last one computed logits over the whole
    vocabulary, so for every sampling step rank 0 computes the rows before `split`
    while the last rank computes the rest. Each keeps only its rows of the head,
    unless it uses the module for more (rank 0's lookup in a tied embedding). Only for
    a head whose output the model returns as it is (`Anatomy.head`); other uses of
    the module are as for any part.

    In the model's forward pass it stands where the head was. On rank 0 the head
    passes its input through (the model's output there is the send to the next rank).
    On the last rank it gives the logits of rows `split:` and keeps its input, which
    rank 0 needs for the rows before `split`.
    """

    def __init__(self, module: nn.Module, anatomy: Anatomy, phases: set[str], last: bool):
        split = anatomy.vocab // 2
        offset = 0  # the vocabulary row the module held here begins at
        if head_alone(anatomy, phases):
            offset, stop = (split, anatomy.vocab) if last else (0, split)
            module = rows_of(module, offset, stop)
        super().__init__(module, anatomy.parts[anatomy.head.path], phases)
        self.method = anatomy.head.method
        self.last = last
        self.hidden_size = anatomy.head.input_size
        self.input_dtype = anatomy.head.input_dtype
        self.logits_dtype = anatomy.logits_dtype
        self.vocab = anatomy.vocab
        self.split = split
        self.offset = offset

    def _use(self, method: str, args: tuple, kwargs: dict) -> mx.array:
        if method != self.method:
            return super()._use(method, args, kwargs)
        x = args[0]
        if not self.last:
            return x
        object.__setattr__(self, "hidden", x)
        return self.logits(x, self.split, self.vocab)

    def logits(self, x: mx.array, start: int, stop: int) -> mx.array:
        """Logits of vocabulary rows [start, stop), which this rank holds: for one
        sequence each row's are the same bits as the whole head's."""
        head = rows_of(self["module"], start - self.offset, stop - self.offset)
        return getattr(head, self.method)(x)


def head_alone(anatomy: Anatomy, phases: set[str]) -> bool:
    """Whether a stage running the parts of `phases` uses the head's module for the
    head alone (not for a tied embedding's lookup too): it may then keep only the
    vocabulary rows it computes (`rows_of`)."""
    method = anatomy.head.method
    return all(use.method == method or use.phase not in phases for use in anatomy.parts[anatomy.head.path])


def rows_of(head: nn.Module, start: int, stop: int) -> nn.Module:
    """A copy of `head` (linear, embedding, or their quantized kinds) with only
    vocabulary rows [start, stop); its parameters are slices of the original's."""
    if (start, stop) == (0, head.weight.shape[0]):
        return head
    part = copy.copy(head)
    for name, value in head.parameters().items():
        part[name] = value[start:stop]
    return part


def shares_head(anatomy: Anatomy, stage: Stage) -> bool:
    """Whether rank 0 and the last rank share the head (see `SharedHead`)."""
    return anatomy.head is not None and stage.group_size == 1 and stage.size > 1 and (stage.is_first or stage.is_last)


def kept_parts(anatomy: Anatomy, stage: Stage) -> set[str]:
    """The parts whose weights `stage` holds: those it runs, and the head on rank 0 of
    a ring that shares it."""
    kept = {path for path in anatomy.parts if anatomy.phases(path) & stage.phases}
    if shares_head(anatomy, stage):
        kept.add(anatomy.head.path)
    return kept


def prune_to_stage(model: nn.Module, anatomy: Anatomy, stage: Stage, hops: Hops) -> None:
    """Replace everything this stage does not run, and wire the ring hops."""
    layers = get_path(model, anatomy.layers)
    for i in range(len(layers)):
        if not stage.start <= i < stage.end:
            layers[i] = SkippedLayer(layers[i])
    if not stage.in_first_stage:
        layers[stage.start] = ReceiveHidden(layers[stage.start], hops)
    if not stage.in_last_stage:
        layers[stage.end - 1] = SendHidden(layers[stage.end - 1], hops)
    mark_stage(model, anatomy, stage)
    kept = kept_parts(anatomy, stage)
    for path, uses in anatomy.parts.items():
        module = get_path(model, path) if path in kept else None
        if shares_head(anatomy, stage) and path == anatomy.head.path:
            set_path(model, path, SharedHead(module, anatomy, stage.phases, stage.is_last))
        elif module is None or not anatomy.phases(path) <= stage.phases:
            # Parts the forward pass never uses are dropped too: nothing reads them.
            set_path(model, path, StagePart(module, uses, stage.phases))


def mark_stage(model: nn.Module, anatomy: Anatomy, stage: Stage) -> None:
    """Record what the pipeline asks of the stage later (`shared_head`, `sending_layer`,
    `logits_shape`, `attach_hops`)."""
    object.__setattr__(model, "_ring_stage", (anatomy, stage))


def attach_hops(model: nn.Module, hops: Hops) -> None:
    """Point the stage's ring wrappers at `hops`."""
    anatomy, _ = model._ring_stage
    for layer in layer_list(model, anatomy):
        while isinstance(layer, _LayerWrapper):  # a one-layer stage's layer is wrapped twice
            object.__setattr__(layer, "hops", hops)
            layer = layer["layer"]


def layer_list(model: nn.Module, anatomy: Anatomy) -> list:
    return get_path(model, anatomy.layers)


def shared_head(model: nn.Module) -> Optional[SharedHead]:
    """The head rank 0 and the last rank share, on those two ranks of a ring."""
    anatomy, _ = model._ring_stage
    head = get_path(model, anatomy.head.path) if anatomy.head is not None else None
    return head if isinstance(head, SharedHead) else None


def sending_layer(model: nn.Module) -> SendHidden:
    """The last local layer of a stage before the last: it holds what the stage sends."""
    anatomy, stage = model._ring_stage
    return layer_list(model, anatomy)[stage.end - 1]


def logits_shape(model: nn.Module) -> tuple[int, mx.Dtype]:
    """The vocabulary size and dtype of the model's logits."""
    anatomy, _ = model._ring_stage
    return anatomy.vocab, anatomy.logits_dtype
