"""The spool: the only channel between the HTTP front and rank 0."""

from spool.queue import Spool, check_id

__all__ = ["Spool", "check_id"]
