"""One rank's life, after its entry point (server.py) has chosen the BLAS."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from config import Settings
from distributed.cluster import start_cluster
from distributed.doorbell import RingBroken
from distributed.follower import follow
from distributed.one_shot import run_once
from distributed.serving import serve
from distributed.world import join_world
from models import served_name
from spool import Spool

log = logging.getLogger(__name__)


def setup_logging(level: str, rank: int, log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        path = Path(log_file.format(rank=rank))
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path))
    logging.basicConfig(
        level=level,
        handlers=handlers,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
    )


def run_rank(settings: Settings, args: argparse.Namespace) -> int:
    """This rank's whole life: join the world, load its stage, then follow rank 0, or
    as rank 0 serve the spool or generate once."""
    world = join_world(settings.backend)
    setup_logging(settings.log_level, world.rank(), args.log_file)
    spool = None
    if args.prompt is None and world.rank() == 0:
        spool = Spool(settings.spool_dir)
        spool.write_heartbeat({"state": "loading", "model": served_name(settings.model_repo)})
    try:
        cluster = start_cluster(settings, world)
    except ValueError as err:
        log.error("%s", err)
        if spool is not None:
            spool.write_heartbeat({"state": "failed", "reason": str(err)})
        return 2
    try:
        if not cluster.stage.is_first:
            follow(cluster.pipeline)
            log.info("released by rank 0; exiting")
            return 0
        if args.prompt is not None:
            return run_once(cluster, args, args.max_tokens or settings.default_max_tokens)
        return serve(cluster, settings, spool)
    except RingBroken as err:
        # Claimed requests stay claimed: the next start puts them back in the queue.
        log.error("ring broken: %s", err)
        if spool is not None:
            spool.write_heartbeat({"state": "failed", "reason": f"ring broken: {err}"})
        return 1
