"""`python -m launcher.mlx_launch ARGS`: mlx.launch without its busy I/O loop.

mlx.launch (mlx 0.32.4) selects on its ranks' stdin pipes for writing, always ready,
and on its own stdin: with nothing to forward it spins a whole core for the life of the
ring (measured here: 100-130% CPU). Nothing is forwarded to the ranks' stdin, so it
waits for their output only.
"""

from __future__ import annotations

import sys

from mlx._distributed_utils import launch


def main(args: list[str]) -> int:
    real_select = launch.select
    stdin = sys.stdin.fileno()

    def select(rlist, wlist, xlist, timeout):
        return real_select([fd for fd in rlist if fd != stdin], [], xlist, timeout)

    launch.select = select
    sys.argv = ["mlx.launch", *args]
    launch.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
