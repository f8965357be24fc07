"""Bring one rank up: join the world, agree on the layer split, load the stage."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx

from config import Settings
from distributed.constraint import Grammars
from distributed.doorbell import connect, listen, rank_addresses
from distributed.anatomy import Anatomy
from distributed.kv_cache import (
    KVFootprint, KVSettings, batching_refusal, prefix_refusal, refuse_batching, tokens_capacity,
)
from distributed.loading import load_stage, load_stage_tokenizer, local_model_path, parameter_bytes, plan_model
from distributed.limits import Limits
from distributed.parallel import ParallelChoice, choose_parallel, log_choice, stage_group
from distributed.pipeline import Pipeline
from distributed.scheduler import Scheduler
from distributed.shard import NO_HOPS, Stage, attach_hops, ring_hops
from distributed.stage_checks import check_batching, check_kv_bits, measure_footprint
from distributed.world import all_gather_json, rank_record
from distributed.speculation import make_speculation
from distributed.split import plan_split
from distributed.tensor import load_tensor
from distributed.tensor_step import TensorPipeline
from models import resolve_model, vocab_size

log = logging.getLogger(__name__)

ERROR_CHARS = 240  # of a rank's error or refusal, shared in its start record (RECORD_BYTES in all)


@dataclass
class Cluster:
    """Everything one rank holds once the ring is up."""

    world: mx.distributed.Group
    stage: Stage
    pipeline: Pipeline
    scheduler: Optional[Scheduler]  # rank 0 only
    ranks: list[dict]
    model_path: Path
    config: dict
    parallel: ParallelChoice
    tokenizer: Optional[object] = None  # rank 0 only


def kv_settings(settings: Settings) -> KVSettings:
    return KVSettings(
        max_size=settings.kv_cache_max_size,
        bits=settings.kv_bits,
        group_size=settings.kv_group_size,
        quantized_start=settings.quantized_kv_start,
    )


def micro_batches(settings: Settings, ranks: list[dict], stage: Stage) -> int:
    """MICRO_BATCHES, or one per machine: ranks on one machine share its cores; at most
    one per stage. Stages of several ranks (tensor parallel within): one per stage,
    since every rank of a stage works on each of its steps, and a step reads every
    weight once however many sequences it holds (tensor mode: always one)."""
    default = stage.stages if stage.group_size > 1 else len({r["host"] for r in ranks})
    return min(settings.micro_batches or default, stage.stages)


def load_checked(settings: Settings, model_ref: str, path: Path, plan: Anatomy, stage: Stage,
                 world: mx.distributed.Group, group: mx.distributed.Group) -> tuple:
    """This rank's stage, loaded and checked off the ring: the model, its config, its
    caches' footprint, and why sequences cannot share batches here (None if they can).
    In a stage of several ranks (`group`), its part of each layer (tensor parallelism):
    every rank must have loaded its part before the checks, whose steps then
    all-reduce. ValueError if the stage cannot run as set."""
    if stage.group_size == 1:
        model, config, _ = load_stage(model_ref, stage, NO_HOPS, path, plan)
    else:
        model, config = agreed(world, load_tensor, model_ref, stage, group, path, plan)
    kv = kv_settings(settings)
    failed = check_kv_bits(model, stage.start, stage.end, kv)
    if failed:
        raise ValueError(f"KV_BITS={kv.bits} cannot be used with model type {config.get('model_type')!r}: "
                         f"a quantized step of layers {stage.start}-{stage.end - 1} failed ({failed})")
    if settings.speculation != "off" and (why := prefix_refusal(model, kv)):
        raise ValueError(f"SPECULATION={settings.speculation} needs caches that can forget rejected "
                         f"proposals, but {why}")
    footprint = measure_footprint(model, stage.start, stage.end, kv)
    return model, config, footprint, check_batching(model, stage.start, stage.end, kv)


def agreed(world: mx.distributed.Group, load, *args) -> tuple:
    """`load(*args)` on every rank, then agree it went well everywhere (a collective);
    ValueError naming the first rank where it did not."""
    result, error = None, None
    try:
        result = load(*args)
    except ValueError as err:
        error = err
    outcomes = all_gather_json(world, {"rank": world.rank(), "error": error and str(error)[:ERROR_CHARS]})
    failed = next((o for o in outcomes if o["error"]), None)
    if failed is not None:
        raise error or ValueError(f"rank {failed['rank']}: {failed['error']}")
    return result


def start_cluster(settings: Settings, world: mx.distributed.Group) -> Cluster:
    """Collective: every rank calls it with the same settings."""
    rank, size = world.rank(), world.size()
    model_ref = resolve_model(settings.model_repo, settings.model_cache_dir, settings.gguf_quant)
    path = local_model_path(model_ref)
    plan, layer_bytes = plan_model(path)
    records = all_gather_json(world, rank_record(rank))
    parallel = choose_parallel(settings.parallel, world, model_ref, path, plan, settings.tensor_parallel)
    log_choice(parallel)
    per_stage = parallel.group_size
    group = stage_group(world, per_stage)
    # A stage holds 1/per_stage of its layers on each of its ranks: its memory is its
    # smallest rank's, per_stage times.
    memory = [r["memory"] for r in records]
    stage_memory = [per_stage * min(memory[s : s + per_stage]) for s in range(0, size, per_stage)]
    bounds = [(0, plan.count)]
    if len(stage_memory) > 1:
        bounds = plan_split(settings.layer_split, layer_bytes, stage_memory, "ranks" if per_stage == 1 else "stages")
    stage = Stage(rank, size, *bounds[rank // per_stage], per_stage)
    log.info("loading part %d of %d of each of layers %d-%d of %d from %s", stage.member + 1, per_stage,
             stage.start, stage.end - 1, plan.count, model_ref)
    # "shard": this rank's part of each of its layers, [index, parts]; [0, 1] in a pipeline.
    record = rank_record(rank) | {"layers": [stage.start, stage.end], "shard": [stage.member, per_stage]}
    failure: Optional[ValueError] = None
    tokenizer = speculation = None
    try:
        model, config, footprint, batching = load_checked(settings, model_ref, path, plan, stage, world, group)
        record |= {"parameter_bytes": parameter_bytes(model), "kv_footprint": footprint.to_json(),
                   "batching_refusal": batching and batching[:ERROR_CHARS]}
        if stage.is_first:
            tokenizer = load_stage_tokenizer(path, config)
            speculation = make_speculation(settings, tokenizer)  # a draft model fails every rank alike
    except ValueError as err:
        # Every rank fails alike: the others are waiting for this rank's record.
        record["error"] = str(err)[:ERROR_CHARS]
        failure = err
    addresses = rank_addresses(size, settings.cluster_hosts()) if size > 1 else []
    listener = listen(addresses[rank]) if size > 1 and failure is None else None
    record["doorbell"] = listener.getsockname()[1] if listener else None
    ranks = all_gather_json(world, record)
    for r in ranks:
        if "error" in r:
            raise failure or ValueError(f"rank {r['rank']}: {r['error']}")
    attach_hops(model, ring_hops(stage, world, group))
    bell = None
    if listener is not None:
        peer = stage.next_rank
        bell = connect(listener, (addresses[peer], ranks[peer]["doorbell"]), rank, stage.prev_rank)
    footprints = tuple(KVFootprint.from_json(r["kv_footprint"]) for r in ranks)
    limits = Limits(settings.max_sequence_length, settings.kv_cache_reserved_memory_mb * 2**20, footprints)
    log.info("ring ready: %d ranks, KV cache per rank: %s", size, ", ".join(map(str, footprints)))
    # Batching is off ring-wide where any rank's check refused it: rank 0 groups for all.
    refuse_batching(model, next((r["batching_refusal"] for r in ranks if r["batching_refusal"]), None))
    kv = kv_settings(settings)
    if per_stage > 1:
        pipeline = TensorPipeline(model, stage, world, kv, bell, group=group)
    else:
        pipeline = Pipeline(model, stage, world, kv, bell)
    scheduler = None
    if stage.is_first:
        for what, why in (("batching", batching_refusal(model, kv)), ("prompt cache", prefix_refusal(model, kv))):
            if why:
                log.info("%s off: %s", what, why)
        largest = max(f.per_token for f in footprints)
        prompt_cache_tokens = tokens_capacity(settings.prompt_cache_mb * 2**20, largest)
        scheduler = Scheduler(
            pipeline, limits, settings.prefill_step_size, prompt_cache_tokens, micro_batches(settings, ranks, stage),
            settings.pipeline_prefill_step_size, frozenset(tokenizer.eos_token_ids), vocab_size(config),
            Grammars(tokenizer, vocab_size(config)), speculation,
        )
    return Cluster(world, stage, pipeline, scheduler, ranks, path, config, parallel, tokenizer)
