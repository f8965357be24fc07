"""HTTP front entry point: `python api.py` serves the OpenAI-compatible API (the
`http_api` package) on API_HOST:API_PORT. The front never talks to the ranks
directly, only through the spool, so it stays up, and keeps accepting requests,
while the ring restarts.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from config import settings_or_exit
from http_api import create_app

# s a stopping API lets its requests finish; then uvicorn cancels them, which cancels them in
# the spool too (their clients are cut off). Well under the launcher's kill grace, so that an
# open stream never gets the API SIGKILLed before it has cleaned up.
SHUTDOWN_GRACE = 2.0


def main() -> int:
    settings = settings_or_exit()
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s api %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=SHUTDOWN_GRACE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
