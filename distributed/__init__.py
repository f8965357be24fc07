"""The ring: joining the world, the layer split, loading a stage, rank 0's scheduler and
serving loop, and the followers' loop.

Every module here imports MLX, whose BLAS is bound when MLX is first imported: entry
points choose it first (`config.blas.use_blas`), as server.py does.
"""
