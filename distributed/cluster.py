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
from distributed.world import all_gather_json, rank_record
from distributed.kv_cache import KVSettings, kv_bytes_per_token, token_capacity
from distributed.limits import Limits
from distributed.pipeline import Pipeline
from distributed.scheduler import Scheduler
from distributed.split import plan_split
from distributed.shard import (
    Stage,
    count_layers,
    hidden_dtype,
    load_stage,
    load_stage_tokenizer,
    local_layers,
    local_model_path,
    parameter_bytes,
)
from models import resolve_model, vocab_size

log = logging.getLogger(__name__)


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
    tokenizer: Optional[object] = None  # rank 0 only


def kv_settings(settings: Settings) -> KVSettings:
    return KVSettings(
        max_size=settings.kv_cache_max_size,
        bits=settings.kv_bits,
        group_size=settings.kv_group_size,
        quantized_start=settings.quantized_kv_start,
    )


def micro_batches(settings: Settings, ranks: list[dict]) -> int:
    """MICRO_BATCHES, or one per machine: ranks on one machine share its cores."""
    machines = len({r["host"] for r in ranks})
    return min(settings.micro_batches or machines, len(ranks))


def start_cluster(settings: Settings, world: mx.distributed.Group) -> Cluster:
    """Collective: every rank calls it with the same settings."""
    rank, size = world.rank(), world.size()
    model_ref = resolve_model(settings.model_repo, settings.model_cache_dir)
    path = local_model_path(model_ref)
    num_layers = count_layers(path)
    records = all_gather_json(world, rank_record(rank))
    bounds = plan_split(settings.layer_split, num_layers, [r["memory"] for r in records])
    stage = Stage(rank, size, *bounds[rank])
    log.info("loading layers %d-%d of %d from %s", stage.start, stage.end - 1, num_layers, model_ref)
    model, config = load_stage(model_ref, stage, world, path)

    kv = kv_settings(settings)
    per_token = kv_bytes_per_token(
        local_layers(model, stage), model.args.hidden_size, hidden_dtype(model)
    )
    addresses = rank_addresses(size, settings.cluster_hosts()) if size > 1 else []
    listener = listen(addresses[rank]) if size > 1 else None
    record = rank_record(rank) | {
        "layers": [stage.start, stage.end],
        "parameter_bytes": parameter_bytes(model),
        "kv_bytes_per_token": per_token,
        "doorbell": listener.getsockname()[1] if listener else None,
    }
    ranks = all_gather_json(world, record)
    bell = None
    if listener is not None:
        peer = stage.next_rank
        bell = connect(listener, (addresses[peer], ranks[peer]["doorbell"]), rank, stage.prev_rank)
    largest = max(r["kv_bytes_per_token"] for r in ranks)
    limits = Limits(
        settings.max_sequence_length,
        token_capacity(settings.kv_cache_reserved_memory_mb * 2**20, largest),
        kv,
    )
    log.info("ring ready: %d ranks, KV capacity %d tokens", size, limits.kv_capacity)
    pipeline = Pipeline(model, stage, world, kv, bell)
    scheduler = tokenizer = None
    if stage.is_first:
        prompt_cache_tokens = token_capacity(settings.prompt_cache_mb * 2**20, largest)
        tokenizer = load_stage_tokenizer(path, config)
        scheduler = Scheduler(
            pipeline, limits, settings.prefill_step_size, prompt_cache_tokens, micro_batches(settings, ranks),
            frozenset(tokenizer.eos_token_ids), vocab_size(config), Grammars(tokenizer, vocab_size(config)),
        )
    return Cluster(world, stage, pipeline, scheduler, ranks, path, config, tokenizer)
