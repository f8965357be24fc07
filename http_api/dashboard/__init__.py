"""The dashboard: one page (`GET /`) and its static files, served as they are (no build
step, nothing fetched from elsewhere). It reads `/v1/cluster/events` and chats through
`/v1/chat/completions`, with the API key the person gives it."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

STATIC = Path(__file__).parent / "static"


class DashboardSettings(BaseModel):
    """What the page must know before it calls /v1/ (a call without the key would fail)."""

    api_key_required: bool


def install_dashboard(app: FastAPI) -> None:
    """`GET /` the page, `/dashboard/*` its scripts and styles."""

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    # Before the mount below, which would take the path otherwise.
    @app.get("/dashboard/settings.json", include_in_schema=False)
    async def dashboard_settings(request: Request) -> DashboardSettings:
        return DashboardSettings(api_key_required=bool(request.app.state.settings.api_key))

    app.mount("/dashboard", StaticFiles(directory=STATIC), name="dashboard")
