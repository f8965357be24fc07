"""What a model's forward pass does around its layers, found by running it on stand-ins.

mlx-ring splits any mlx-lm decoder whose forward pass is embed → layers → norm →
head, without code per model. To learn where the layers are and what runs before
and after them, the model's own forward pass runs twice on a lazily built model:
every layer replaced by a probe that passes its input through and notes what it was
given, and every other part holding parameters (embedding, norms, head) by a recorder
that notes when it ran and returns a constant of its output's shape. No weight is
read: the parts' real outputs are built but never evaluated, and the only arrays
evaluated are what the layers get besides the hidden state (masks, positions).
The two runs differ in token ids and constants, so an input that depends on the
tokens is seen (a later rank has the hidden state only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

BEFORE, BETWEEN, AFTER = "before", "between", "after"
TRACE_TOKENS = 3  # a prompt of more than one token, so that masks are built
FILLS = (0.5, 0.25)  # what parts return before the layers, in the two runs
AFTER_FILL, LAST_FILL = 1.0, 0.75  # what parts after the layers and the last layer return, in both


class Unsupported(ValueError):
    """A model mlx-ring cannot split, with the reason."""


@dataclass(frozen=True)
class Use:
    """One use of a part by the forward pass: a method called, or an array read."""

    method: str
    phase: str
    # A method's output: the `lead` dimensions it shares with its input, then `trailing`.
    lead: int = 0
    trailing: Optional[tuple[int, ...]] = None
    dtype: Optional[mx.Dtype] = None


@dataclass(frozen=True)
class Head:
    """The part whose output is the model's logits, as is: rank 0 may share it."""

    path: str
    method: str
    input_size: int
    input_dtype: mx.Dtype


@dataclass(frozen=True)
class Anatomy:
    layers: str  # dotted path of the layer list the model owns, e.g. "model.layers"
    count: int
    parts: dict[str, tuple[Use, ...]]  # dotted path → its uses, for parts holding parameters
    vocab: int
    logits_dtype: mx.Dtype
    head: Optional[Head]  # None where logits change after the head (softcap, scale)

    def phases(self, path: str) -> set[str]:
        return {use.phase for use in self.parts[path]}


def get_path(model: nn.Module, path: str) -> Any:
    node = model
    for key in path.split("."):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def set_path(model: nn.Module, path: str, value: Any) -> None:
    parent, _, key = path.rpartition(".")
    node = get_path(model, parent) if parent else model
    if isinstance(node, list):
        node[int(key)] = value
    else:
        node[key] = value


def _children(node: Any, path: str):
    """(path, child) for the modules and module lists directly inside `node`."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        if isinstance(value, (nn.Module, list)) and not isinstance(value, mx.array):
            yield f"{path}.{key}" if path else str(key), value


def find_layer_list(model: nn.Module) -> str:
    """The list the forward pass iterates: the one holding the layers `model.layers`
    gives (mlx-lm's convention; PipelineMixin models give a slice copy of it, so the
    list the model owns is found by its elements), else the longest list of modules."""
    found = []

    def walk(node: Any, path: str) -> None:
        for child_path, child in _children(node, path):
            if isinstance(child, list):
                if child and all(isinstance(m, nn.Module) for m in child):
                    found.append((len(child), -child_path.count("."), child_path, child))
                    continue
            walk(child, child_path)

    walk(model, "")
    if not found:
        raise Unsupported("no list of layers found in the model")
    named = getattr(model, "layers", None)
    for *_, path, layers in found:
        if isinstance(named, list) and named and any(layer is named[0] for layer in layers):
            return path
    return max(found, key=lambda f: f[:3])[2]


def hidden_argument(args: tuple, kwargs: dict) -> Optional[Any]:
    """Where a layer call passes the hidden state: the first positional argument, or
    else the first keyword argument holding an array (gptj's `inputs=`)."""
    if args:
        return 0
    return next((k for k, v in kwargs.items() if isinstance(v, mx.array)), None)


def find_parts(model: nn.Module, layers: str) -> list[str]:
    """Modules outside the layers that hold parameters: the children of the layer list's
    ancestors, except the list itself. The ancestors' own arrays stay on every rank."""
    parts, ancestors = [], layers.split(".")[:-1]
    node, path = model, ""
    for depth in range(len(ancestors) + 1):
        for child_path, child in _children(node, path):
            if child_path == layers or (depth < len(ancestors) and child_path == ".".join(ancestors[: depth + 1])):
                continue
            modules = child if isinstance(child, list) else [child]
            for i, module in enumerate(modules):
                sub = f"{child_path}.{i}" if isinstance(child, list) else child_path
                if isinstance(module, nn.Module) and tree_flatten(module.parameters()):
                    parts.append(sub)
        if depth < len(ancestors):
            node, path = node[ancestors[depth]], ".".join(ancestors[: depth + 1])
    return parts


def _arrays(value: Any) -> list[mx.array]:
    if isinstance(value, mx.array):
        return [value]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _arrays(v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _arrays(v)]
    return []


@dataclass
class _Run:
    """What one traced forward pass saw."""

    count: int
    caches: list
    fill: float
    calls: list[int] = field(default_factory=list)
    extras: list[list[mx.array]] = field(default_factory=list)
    uses: dict[str, list[Use]] = field(default_factory=dict)
    outputs: list[tuple[mx.array, str, str, Any]] = field(default_factory=list)  # (output, path, method, input)
    after_inputs: list[mx.array] = field(default_factory=list)
    last: Optional[mx.array] = None
    problem: Optional[str] = None

    @property
    def phase(self) -> str:
        return BEFORE if not self.calls else AFTER if len(self.calls) >= self.count else BETWEEN

    def layer(self, index: int, args: tuple, kwargs: dict) -> mx.array:
        key = hidden_argument(args, kwargs)
        x = args[0] if key == 0 else kwargs.get(key)
        if not isinstance(x, mx.array):
            self.problem = self.problem or f"layer {index} is not given the hidden state as its first argument"
            return x
        rest = [v for k, v in [*enumerate(args), *kwargs.items()] if k != key]
        if self.calls and x is not self.last:
            self.problem = self.problem or (
                f"layer {index} does not take the previous layer's output as it is "
                "(something runs between layers)")
        for value in rest:
            for j, cache in enumerate(self.caches):
                if value is cache and j != index:
                    self.problem = self.problem or f"layer {index} is given layer {j}'s cache"
        self.calls.append(index)
        self.extras.append(_arrays([v for v in rest if not any(v is c for c in self.caches)]))
        # The last layer's output is the same in both runs: what follows it must not
        # depend on the tokens but through it.
        self.last = mx.full(x.shape, LAST_FILL, x.dtype) if index == self.count - 1 else x
        return self.last

    def part(self, path: str, method: str, fn: Any, args: tuple, kwargs: dict) -> Any:
        phase = self.phase
        if phase == AFTER:
            self.after_inputs += _arrays([args, kwargs])
        out = fn(*args, **kwargs)
        if not isinstance(out, mx.array):
            self.uses.setdefault(path, []).append(Use(method, phase))
            return out
        inputs = args[0].shape if args and isinstance(args[0], mx.array) else ()
        lead = 0
        while lead < min(len(inputs), len(out.shape)) and inputs[lead] == out.shape[lead]:
            lead += 1
        self.uses.setdefault(path, []).append(Use(method, phase, lead, tuple(out.shape[lead:]), out.dtype))
        const = mx.full(out.shape, self.fill if phase == BEFORE else AFTER_FILL, out.dtype)
        self.outputs.append((const, path, method, args[0] if args else None))
        return const

    def read(self, path: str, key: str) -> None:
        self.uses.setdefault(path, []).append(Use(f".{key}", self.phase))


class _Probe(nn.Module):
    """Stands for a layer during a trace: notes its inputs and passes the hidden state on."""

    def __init__(self, layer: nn.Module, index: int, run: _Run):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_at", (index, run))

    @property
    def __class__(self):  # model code picks masks by layer type (olmo_hybrid)
        return type(object.__getattribute__(self, "_layer"))

    def __call__(self, *args, **kwargs):
        index, run = self._at
        return run.layer(index, args, kwargs)

    def __getattr__(self, key: str) -> Any:
        # Forward passes read flags such as `use_sliding` off their layers.
        return getattr(object.__getattribute__(self, "_layer"), key)


class _Recorder(nn.Module):
    """Stands for a part during a trace: runs it (lazily) and notes each use."""

    def __init__(self, module: nn.Module, path: str, run: _Run):
        super().__init__()
        object.__setattr__(self, "_at", (module, path, run))

    def __call__(self, *args, **kwargs):
        module, path, run = self._at
        return run.part(path, "__call__", module, args, kwargs)

    def __getattr__(self, key: str) -> Any:
        module, path, run = object.__getattribute__(self, "_at")
        value = getattr(module, key)
        if isinstance(value, mx.array):
            run.read(path, key)
        elif callable(value) and not isinstance(value, nn.Module):
            return lambda *args, **kwargs: run.part(path, key, value, args, kwargs)
        return value


def _trace(model: nn.Module, layers: str, parts: list[str], run_index: int) -> tuple[_Run, Any]:
    """One forward pass of a prompt with every layer and part stood in for, then put back."""
    layer_list = get_path(model, layers)
    caches = make_prompt_cache(model)
    run = _Run(len(layer_list), caches, FILLS[run_index])
    originals = list(layer_list)
    kept = {path: get_path(model, path) for path in parts}
    try:
        layer_list[:] = [_Probe(layer, i, run) for i, layer in enumerate(originals)]
        for path, module in kept.items():
            set_path(model, path, _Recorder(module, path, run))
        ids = mx.full((1, TRACE_TOKENS), run_index, dtype=mx.int32)
        out = model(ids, cache=caches)
    finally:
        layer_list[:] = originals
        for path, module in kept.items():
            set_path(model, path, module)
    return run, out


def _head(model: nn.Module, run: _Run, out: mx.array) -> Optional[Head]:
    """The part whose output the model returns unchanged, if its parameters are rows of
    the vocabulary (so that rank 0 can compute some rows' logits with it)."""
    found = [entry for entry in run.outputs if entry[0] is out]
    if not found:
        return None
    _, path, method, x = found[0]
    params = [p for _, p in tree_flatten(get_path(model, path).parameters())]
    if method not in ("__call__", "as_linear") or not isinstance(x, mx.array):
        return None
    if any(p.ndim == 0 or p.shape[0] != out.shape[-1] for p in params):
        return None
    return Head(path, method, x.shape[-1], x.dtype)


def _same(mine: list[mx.array], theirs: list[mx.array]) -> bool:
    return len(mine) == len(theirs) and all(
        a.shape == b.shape and mx.array_equal(a, b, equal_nan=True).item() for a, b in zip(mine, theirs))


def discover(model: nn.Module) -> Anatomy:
    """The anatomy of `model`'s forward pass; Unsupported (naming why) where mlx-ring
    cannot split it: layers that do not each take and return one hidden array once
    and in order, a cache list that is not one cache per layer, inputs to the layers
    beyond the hidden state that depend on the tokens, parts that run between layers."""
    layers = find_layer_list(model)
    count = len(get_path(model, layers))
    caches = make_prompt_cache(model)
    if len(caches) != count:
        raise Unsupported(f"its cache list has {len(caches)} caches for {count} layers ({layers})")
    parts = find_parts(model, layers)
    runs = []
    for i in range(len(FILLS)):
        try:
            runs.append(_trace(model, layers, parts, i))
        except Exception as err:  # the forward pass itself refused the stand-ins
            raise Unsupported(
                "its layers do not each take and return one hidden array: its forward pass fails "
                f"on pass-through layers ({type(err).__name__}: {err})") from err
    (run, out), (other, other_out) = runs
    if run.problem:
        raise Unsupported(run.problem)
    if run.calls != list(range(count)):
        raise Unsupported(f"its layers are not each called once in order (calls: {run.calls[:12]})")
    for i, (mine, theirs) in enumerate(zip(run.extras, other.extras)):
        if not _same(mine, theirs):
            raise Unsupported(f"layer {i} is given arrays besides the hidden state that depend on the tokens")
    if not isinstance(out, mx.array):
        raise Unsupported(f"its forward pass returns {type(out).__name__}, not logits")
    if not _same([*run.after_inputs, out], [*other.after_inputs, other_out]):
        raise Unsupported("what runs after the layers depends on the tokens other than through them")
    for path, uses in run.uses.items():
        if any(use.phase == BETWEEN for use in uses):
            raise Unsupported(f"{path} runs between layers")
        if any(use.method.startswith(".") for use in uses):
            raise Unsupported(f"its forward pass reads {path}'s arrays directly")
        if any(use.phase == BEFORE and use.trailing is None for use in uses):
            raise Unsupported(f"{path} runs before the layers but does not return one array")
        if len({use.method for use in uses}) < len({(use.method, use.phase) for use in uses}):
            raise Unsupported(f"{path} runs both before and after the layers")
    uses = {path: tuple(run.uses.get(path, ())) for path in parts}
    return Anatomy(layers, count, uses, out.shape[-1], out.dtype, _head(model, run, out))
