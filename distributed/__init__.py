"""The ring: joining the world, the layer split, loading a stage and the step loop.

Every module here imports MLX, and on Linux the BLAS that MLX calls is bound when MLX is
first imported. Choosing it here (FAST_BLAS, see config/blas.py) comes before any of them,
so every process that runs our MLX code gets the configured BLAS, whatever its entry point.
"""

from config.blas import use_blas

use_blas()
