"""Joining the world (MLX's communication group of every rank), and facts each rank
shares with the others at start."""

from __future__ import annotations

import atexit
import ctypes.util
import gc
import json
import logging
import os
import platform
import socket

import mlx.core as mx
import psutil

from config.blas import blas_in_use

log = logging.getLogger(__name__)

# Bytes reserved per rank when gathering a JSON record.
RECORD_BYTES = 1024


def point_mlx_at_mpi() -> None:
    """MLX opens `libmpi.so`, which only MPI's development package provides on
    Debian; point it at the runtime library when that is all there is."""
    if "MLX_MPI_LIBNAME" in os.environ or platform.system() != "Linux":
        return
    found = ctypes.util.find_library("mpi")
    if found and found != "libmpi.so":
        os.environ["MLX_MPI_LIBNAME"] = found


def finalize_lone_mpi() -> None:
    """Finalize MPI if MLX initialized it and left it so. MLX does that for a world of
    one (`mpirun -np 1`), and mpirun then calls the rank's exit abnormal and fails."""
    name = os.environ.get("MLX_MPI_LIBNAME") or ctypes.util.find_library("mpi")
    try:
        mpi = ctypes.CDLL(name) if name else None
    except OSError:
        mpi = None
    if mpi is None:
        return
    initialized, finalized = ctypes.c_int(0), ctypes.c_int(0)
    mpi.MPI_Initialized(ctypes.byref(initialized))
    mpi.MPI_Finalized(ctypes.byref(finalized))
    if initialized.value and not finalized.value:
        mpi.MPI_Finalize()


def join_world(backend: str) -> mx.distributed.Group:
    """Join the world for `backend` ('any', 'ring', 'mpi', 'jaccl'); alone, a world of one."""
    if backend in ("any", "mpi"):
        point_mlx_at_mpi()
    world = mx.distributed.init(strict=False, backend=backend)
    if world.size() == 1 and backend in ("any", "mpi"):
        atexit.register(finalize_lone_mpi)
    log.info("joined world: rank %d of %d (backend %s)", world.rank(), world.size(), backend)
    return world


def release_groups() -> None:
    """Free the groups split from the world (TENSOR_PARALLEL) before MPI is finalized at
    exit, which aborts a process that frees one later: mlx's sharded layers cache a
    function per group (`sum_gradients`) that would keep it alive until then. Call it
    once a rank's ring is dropped."""
    from mlx.nn.layers.distributed import sum_gradients

    sum_gradients.cache_clear()
    gc.collect()


def available_memory() -> int:
    """Bytes this machine can give to model weights and caches."""
    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"])
    if platform.system() == "Linux":
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def all_gather_json(world: mx.distributed.Group, record: dict) -> list[dict]:
    """Every rank's `record`, in rank order (a collective: all ranks must call it)."""
    data = json.dumps(record).encode()
    if len(data) > RECORD_BYTES:
        raise ValueError(f"record of {len(data)} bytes exceeds {RECORD_BYTES}")
    buf = mx.array(list(data.ljust(RECORD_BYTES, b" ")), dtype=mx.uint8)
    if world.size() > 1:
        buf = mx.distributed.all_gather(buf[None], group=world)
    rows = buf.reshape(world.size(), RECORD_BYTES).tolist()
    return [json.loads(bytes(row).decode()) for row in rows]


def rank_record(rank: int) -> dict:
    """What the other ranks and /health learn about this rank."""
    return {
        "rank": rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        # With the pid, tells this process from a later one given the same pid: the
        # launcher signals a rank only when both match.
        "created": psutil.Process().create_time(),
        "memory": available_memory(),
        "memory_total": psutil.virtual_memory().total,
        "device": mx.default_device().type.name,
        "blas": blas_in_use(),
    }
