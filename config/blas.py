"""Which BLAS MLX calls on Linux: Debian's OpenBLAS over the mlx-cpu wheel's reference BLAS.

The mlx-cpu wheel's libmlx.so links a bundled reference BLAS, correct but slow. Loading
OpenBLAS with RTLD_GLOBAL before libmlx.so is loaded puts its `cblas_sgemm` (and LAPACK)
ahead of the bundled ones when the dynamic linker binds libmlx.so's symbols, the same
effect as LD_PRELOAD: a decode step's matmul runs about 2x faster, a batch of 8 about 6x
(bench/blas.py). The choice must therefore come before `mlx.core` is first imported, and
cannot change afterwards. On macOS MLX uses Metal and Accelerate: nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys
from pathlib import Path

from config.settings import SettingsError, load_settings

log = logging.getLogger(__name__)

# Where Debian's libopenblas0-pthread (installed by `./launch.sh setup`) puts the library.
DEBIAN_OPENBLAS = Path(f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libopenblas.so.0")

REFERENCE = "reference"

# OpenBLAS's idle threads spin for about 0.1 s after each call before they sleep
# (THREAD_TIMEOUT 2^28 cycles), on the cores that a neighbour rank sharing this
# machine computes on: a 2-rank pipeline on 2 cores decoded 20% slower. The
# shortest timeout cost a single process nothing measurable (bench/throughput.py).
THREAD_TIMEOUT = "4"

# The choice made in this process. Module state because it mirrors the dynamic linker's,
# which is per process and fixed once MLX is loaded.
_in_use: str | None = None


def find_openblas() -> str | None:
    """Debian's path, or what the linker's cache knows as libopenblas; None when absent."""
    if DEBIAN_OPENBLAS.exists():
        return str(DEBIAN_OPENBLAS)
    return ctypes.util.find_library("openblas")


def use_blas(fast: bool | None = None) -> str:
    """Choose the BLAS for MLX in this process and return it: "openblas <library>",
    "reference" or, on macOS, "accelerate".

    `fast` defaults to FAST_BLAS from the settings. Call it before MLX is first imported;
    the first call decides and later ones return that choice.
    """
    global _in_use
    if _in_use is None:
        _in_use = _choose(_fast_blas_setting() if fast is None else fast)
    return _in_use


def blas_in_use() -> str:
    """The choice use_blas made in this process; "reference" if it was never called."""
    return _in_use or REFERENCE


def _fast_blas_setting() -> bool:
    try:
        return load_settings().fast_blas
    except SettingsError:
        # The entry point reports the bad setting and exits; nothing gets computed.
        return False


def _choose(fast: bool) -> str:
    if platform.system() != "Linux":
        return "accelerate"
    if not fast:
        return REFERENCE
    if "mlx.core" in sys.modules:
        log.warning("FAST_BLAS: MLX was imported before the BLAS was chosen; it keeps the reference BLAS")
        return REFERENCE
    library = find_openblas()
    if library is None:
        log.warning(
            "FAST_BLAS is on but OpenBLAS is not installed: MLX uses the slow reference BLAS. "
            "Run `./launch.sh setup` (apt-get install libopenblas0-pthread), or set FAST_BLAS=0."
        )
        return REFERENCE
    # OpenBLAS reads it when loaded.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", THREAD_TIMEOUT)
    try:
        ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        log.warning("FAST_BLAS: cannot load %s (%s): MLX uses the reference BLAS", library, err)
        return REFERENCE
    return f"openblas {library}"
