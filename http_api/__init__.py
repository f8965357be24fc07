"""The HTTP front: OpenAI's API over the spool. `create_app` builds it; `api.py` serves it."""

from http_api.app import create_app

__all__ = ["create_app"]
