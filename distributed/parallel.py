"""How the ranks share the model (PARALLEL): a pipeline of whole layers, or tensor
parallelism (1/N of every layer); `auto` measures and takes the faster.

Decode reads every weight once per token. In a pipeline a token visits the ranks in
turn, so it takes as long as on one machine, plus a hop per rank; split N ways, every
layer's work takes 1/N of the time, plus two all-reduces per layer. Which wins depends
on the link: `auto` measures it (a small all-reduce's round trip, a one-token hidden
state's trip around the ring from rank to rank, and a large all-reduce's bandwidth) and
one decoder layer's compute, at start, and estimates one sequence's token both ways for
this model:

    pipeline = L*layer + head/2 + ring_trip + (vocab/2 logits)/bandwidth
    tensor   = (L*layer + head)/N + (2L + 2)*all_reduce + (vocab logits)/bandwidth

(L layers, N ranks; the ring trip is timed with the sends and receives between ring
neighbours that a pipeline's token makes, N hops, where an all-reduce of the ring
backend takes 2(N-1) (measured over a relay adding 3 ms each way: 6.3 ms an all-reduce,
6.4 ms a 2-rank trip); the head's time is the layer's scaled by their weights' bytes;
the pipeline shares its head between rank 0 and the last rank, tensor mode among all
ranks and all-gathers the logits; the 2 extra all-reduces carry the step's token ids.) It assumes machines alike, as the tensor
split does (each holds 1/N): on machines of unequal memory choose the pipeline.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import load_model

from distributed.anatomy import Anatomy, get_path
from distributed.loading import parameter_bytes
from distributed.shard import layer_list
from distributed.tensor import shard_problem
from distributed.world import all_gather_json

log = logging.getLogger(__name__)

# Small all-reduces and ring trips timed. Each figure is their lower quartile: a link's
# delay shows in every one of them, a moment another process held a rank's core (as it
# does on a shared machine for a scheduler's slice, several ms) only in some.
SMALL_REPEATS = 40
LARGE_BYTES = 4 * 2**20  # a large all-reduce, for the link's bandwidth
LARGE_REPEATS = 3
LAYER_REPEATS = 12  # decode steps of one layer timed (lower quartile, as above)
CONTEXT = 32  # tokens in the timed layer's cache, as a short conversation has


@dataclass(frozen=True)
class ParallelChoice:
    """The mode the ranks run in, why, and auto's figures (for the log and /health)."""

    mode: str  # "pipeline", "tensor" or "hybrid" (stages of TENSOR_PARALLEL ranks)
    requested: str  # PARALLEL
    reason: str
    figures: dict = field(default_factory=dict)
    group_size: int = 1  # ranks per pipeline stage, each holding 1/group_size of its layers

    def record(self) -> dict:
        record = {"mode": self.mode, "requested": self.requested, "reason": self.reason} | self.figures
        if self.mode == "hybrid":
            record["tensor_parallel"] = self.group_size
        return record


def choose_parallel(
    requested: str, world: mx.distributed.Group, model: str, path: Path, anatomy: Anatomy, tensor_parallel: int = 0
) -> ParallelChoice:
    """Collective: every rank calls it with the same settings and gets the same choice.
    `anatomy`: the model's, from its config (`distributed.loading.plan_model`);
    `tensor_parallel`: TENSOR_PARALLEL (0: unset)."""
    size = world.size()
    if tensor_parallel:
        return fixed_groups(requested, size, tensor_parallel, path)
    if size == 1:
        return ParallelChoice("pipeline", requested, "one rank: nothing to split")
    if requested == "pipeline":
        return ParallelChoice("pipeline", requested, "PARALLEL=pipeline")
    skeleton, _ = load_model(path, lazy=True, strict=False)
    problem = shard_problem(skeleton, size)
    if requested == "tensor":
        if problem is not None:
            raise ValueError(f"PARALLEL=tensor: {problem}; use PARALLEL=pipeline or auto")
        return ParallelChoice("tensor", requested, "PARALLEL=tensor", group_size=size)
    if problem is not None:
        return ParallelChoice("pipeline", requested, f"the model cannot be split by tensor: {problem}")
    figures = measure(world, skeleton, anatomy, model, path)
    tensor, pipeline = figures["token_ms"]["tensor"], figures["token_ms"]["pipeline"]
    mode = "tensor" if tensor < pipeline else "pipeline"
    reason = f"estimated {tensor:.1f} ms a token split by tensor, {pipeline:.1f} ms by pipeline"
    return ParallelChoice(mode, requested, reason, figures, size if mode == "tensor" else 1)


def fixed_groups(requested: str, size: int, group_size: int, path: Path) -> ParallelChoice:
    """TENSOR_PARALLEL=T: pipeline stages of T ranks, tensor parallel within each (one
    stage of all ranks is tensor mode, stages of one rank the pipeline)."""
    if size % group_size:
        raise ValueError(f"TENSOR_PARALLEL={group_size} does not divide the {size} ranks into equal stages")
    if group_size > 1 and requested == "pipeline":
        raise ValueError(f"TENSOR_PARALLEL={group_size} splits layers among ranks, which PARALLEL=pipeline does "
                         "not; set PARALLEL=auto or tensor, or leave TENSOR_PARALLEL unset")
    reason = f"TENSOR_PARALLEL={group_size}: {size // group_size} stages of {group_size} ranks"
    if group_size == 1:
        return ParallelChoice("pipeline", requested, reason)
    skeleton, _ = load_model(path, lazy=True, strict=False)
    problem = shard_problem(skeleton, group_size)
    if problem is not None:
        raise ValueError(f"TENSOR_PARALLEL={group_size}: {problem}; use PARALLEL=pipeline")
    return ParallelChoice("tensor" if group_size == size else "hybrid", requested, reason, group_size=group_size)


def stage_group(world: mx.distributed.Group, group_size: int) -> mx.distributed.Group:
    """The ranks of this rank's stage: the world, or consecutive ranks of `group_size`
    split from it, which only some backends can do (MPI; not MLX's ring backend)."""
    if group_size in (1, world.size()):
        return world
    rank = world.rank()
    try:
        return world.split(rank // group_size, rank % group_size)
    except RuntimeError as err:
        why = (f"TENSOR_PARALLEL={group_size} needs a backend that splits the ranks into groups, such as MPI "
               f"(BACKEND=mpi), but this one cannot ({err}); use PARALLEL=tensor or pipeline")
    raise ValueError(why)


def measure(world: mx.distributed.Group, skeleton: nn.Module, anatomy: Anatomy, model: str, path: Path) -> dict:
    """Collective: the link and one layer, timed on every rank; the slowest rank's
    figures, and the estimates built from them, identical on every rank."""
    if fetch_first_layer(model, path):
        skeleton, _ = load_model(path, lazy=True, strict=False)  # now with the real tensors
    hidden_size, dtype = skeleton.args.hidden_size, anatomy.logits_dtype
    first = layer_list(skeleton, anatomy)[0]
    mine = time_link(world, hidden_size, dtype) | {"layer_ms": time_layer(first, hidden_size, dtype)}
    ranks = all_gather_json(world, mine)
    all_reduce_us = max(r["all_reduce_us"] for r in ranks)
    bandwidth = min(r["bandwidth_mb_s"] for r in ranks) * 1e6
    layer_ms = max(r["layer_ms"] for r in ranks)
    head = get_path(skeleton, anatomy.head.path) if anatomy.head is not None else None
    head_ms = layer_ms * parameter_bytes(head) / parameter_bytes(first) if head is not None else 0.0
    logits_ms = 1e3 * anatomy.vocab * mx.float32.size / bandwidth
    ring_trip_us = max(r["ring_trip_us"] for r in ranks)
    compute_ms = anatomy.count * layer_ms
    estimate = {
        "pipeline": compute_ms + head_ms / 2 + ring_trip_us / 1e3 + logits_ms / 2,
        "tensor": (compute_ms + head_ms) / world.size() + (2 * anatomy.count + 2) * all_reduce_us / 1e3 + logits_ms,
    }
    return {
        "all_reduce_us": round(all_reduce_us, 1),
        "ring_trip_us": round(ring_trip_us, 1),
        "bandwidth_mb_s": round(bandwidth / 1e6, 1),
        "layer_ms": round(layer_ms, 3),
        "head_ms": round(head_ms, 3),
        "token_ms": {mode: round(ms, 2) for mode, ms in estimate.items()},
    }


def time_link(world: mx.distributed.Group, hidden_size: int, dtype: mx.Dtype) -> dict:
    """A one-token hidden state's all-reduce round trip and trip around the ring, and a
    large all-reduce's bandwidth."""
    small = mx.ones((1, 1, hidden_size), dtype=dtype)
    large = mx.ones((LARGE_BYTES // 4,), dtype=mx.float32)
    mx.eval(small, large)
    small_s = lower_quartile(lambda: mx.eval(mx.distributed.all_sum(small, group=world)), SMALL_REPEATS)
    trip_s = lower_quartile(lambda: ring_trip(world, small), SMALL_REPEATS)
    mx.eval(mx.distributed.all_sum(large, group=world))
    start = time.perf_counter()
    for _ in range(LARGE_REPEATS):
        mx.eval(mx.distributed.all_sum(large, group=world))
    large_s = (time.perf_counter() - start) / LARGE_REPEATS
    return {"all_reduce_us": small_s * 1e6, "ring_trip_us": trip_s * 1e6,
            "bandwidth_mb_s": LARGE_BYTES / max(large_s - small_s, 1e-9) / 1e6}


def ring_trip(world: mx.distributed.Group, hidden: mx.array) -> None:
    """`hidden` from rank 0 around the ring and back, each rank receiving it from the one
    before and sending it to the next, as a pipeline's token goes."""
    rank, size = world.rank(), world.size()
    if rank == 0:
        mx.eval(mx.distributed.send(hidden, 1, group=world))
        mx.eval(mx.distributed.recv_like(hidden, size - 1, group=world))
    else:
        got = mx.distributed.recv_like(hidden, rank - 1, group=world)
        mx.eval(mx.distributed.send(got, (rank + 1) % size, group=world))


def lower_quartile(step: Callable[[], None], repeats: int, warm_up: int = 3) -> float:
    """Seconds of `step`: the lower quartile of `repeats` timings, after `warm_up` untimed
    (the first ones open connections and fill caches)."""
    times = []
    for i in range(warm_up + repeats):
        start = time.perf_counter()
        step()
        if i >= warm_up:
            times.append(time.perf_counter() - start)
    return statistics.quantiles(times, n=4)[0]


def time_layer(layer: nn.Module, hidden_size: int, dtype: mx.Dtype) -> float:
    """Milliseconds of one decode step of a decoder layer, whole, on this rank (called
    as the models that define shard() call theirs: hidden state, mask, cache)."""
    mx.eval(layer.parameters())  # read from disk: only this layer's tensors
    cache = KVCache()
    context = mx.random.normal((1, CONTEXT, hidden_size)).astype(dtype)
    mx.eval(layer(context, "causal", cache))
    token = mx.random.normal((1, 1, hidden_size)).astype(dtype)
    return 1e3 * lower_quartile(lambda: mx.eval(layer(token, None, cache)), LAYER_REPEATS, warm_up=1)


def fetch_first_layer(model: str, path: Path) -> bool:
    """For a hub repo, download the weight files holding layer 0, which `time_layer`
    reads (without an index, the one file; in a pipeline, a download the later ranks
    would not need otherwise). Whether anything was fetched."""
    if Path(model).exists():
        return False
    from huggingface_hub import snapshot_download

    index = path / "model.safetensors.index.json"
    patterns = ["model*.safetensors"]
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        patterns = sorted({f for name, f in weight_map.items() if ".layers.0." in f".{name}"})
    snapshot_download(model, allow_patterns=patterns)
    return True


def log_choice(choice: ParallelChoice) -> None:
    figures = choice.figures
    if figures:
        log.info(
            "parallel: %s (PARALLEL=%s): all-reduce %.0f us, ring trip %.0f us, %.0f MB/s; a layer %.2f ms, "
            "the head %.2f ms; %s",
            choice.mode, choice.requested, figures["all_reduce_us"], figures["ring_trip_us"], figures["bandwidth_mb_s"],
            figures["layer_ms"], figures["head_ms"], choice.reason,
        )
    else:
        log.info("parallel: %s (PARALLEL=%s): %s", choice.mode, choice.requested, choice.reason)
