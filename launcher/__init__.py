"""The cluster verbs of `launch.sh` (start, stop, restart, status, logs, setup, test):
`launch.sh` prepares `.venv`, then runs `python -m launcher VERB`."""

from __future__ import annotations

import logging
import sys


def log_to_stderr() -> None:
    """One line per event on stderr, with the prefix users and tests know."""
    logging.basicConfig(format="[launch] %(message)s", level=logging.INFO, stream=sys.stderr)


class LaunchError(Exception):
    """Ends the verb with `[launch] error: MESSAGE` and exit status 1."""
