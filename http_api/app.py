"""The FastAPI app: lifespan (tokenizer, spool) and thin routes."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from config import Settings, load_settings
from http_api import batches, cluster, files
from http_api.anthropic import routes as anthropic_routes
from http_api.batch_runner import BatchRunner
from http_api.cluster_view import serving_problem
from http_api.dashboard import install_dashboard
from http_api.errors import ERROR_RESPONSES, install_error_handlers
from http_api.events import StreamWaker, heartbeat_problem
from http_api.metrics import Metrics
from http_api.middleware import FrontDoor
from http_api.served_model import load_served_model
from http_api.schemas import (
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, Health, ModelCard, ModelList,
)
from http_api.submit import chat, complete
from spool import Spool

log = logging.getLogger(__name__)

# s between re-reads of a stream file inotify said nothing about: only a safety net (an
# overflowed event queue), and every waiting request pays for each look.
INOTIFY_RECHECK = 1.0
_STREAMED = {200: {"content": {"text/event-stream": {}}}}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load what the API knows of the model, and open the spool."""
    settings: Settings = app.state.settings
    app.state.model = load_served_model(settings)
    app.state.spool = Spool(settings.spool_dir)
    app.state.waker = StreamWaker(app.state.spool, recheck=INOTIFY_RECHECK)
    app.state.started = int(time.time())
    app.state.batch_runner = BatchRunner(app.state)
    runner = asyncio.create_task(app.state.batch_runner.run())
    log.info("spool %s", settings.spool_dir)
    yield
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    app.state.waker.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The HTTP front for `settings` (default: read from the environment)."""
    settings = settings or load_settings()
    metrics = Metrics()
    app = FastAPI(title="mlx-ring", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    # An upload's multipart framing comes on top of the file MAX_BATCH_FILE_MB limits.
    upload_bytes = settings.max_batch_file_mb * 2**20 + 64 * 1024
    app.add_middleware(FrontDoor, api_key=settings.api_key, max_bytes=settings.max_request_bytes,
                       metrics=metrics, larger={files.UPLOAD_PATH: upload_bytes})
    if origins := Settings.split_list(settings.cors_origins):
        # Added last, so outermost: a preflight is answered before the API key is asked for.
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], max_age=600)
    install_error_handlers(app)
    app.include_router(anthropic_routes.router)
    app.include_router(cluster.router)
    install_dashboard(app)
    app.include_router(files.router)
    app.include_router(batches.router)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**ERROR_RESPONSES, **_STREAMED})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        request.app.state.model.check_name(body.model)
        return await chat(request, body)

    @app.post("/v1/completions", response_model=Completion, responses={**ERROR_RESPONSES, **_STREAMED})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        request.app.state.model.check_name(body.model)
        return await complete(request, body)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        created = request.app.state.started
        return ModelList(data=[ModelCard(id=name, created=created) for name in request.app.state.model.names])

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health(request: Request) -> Any:
        spool: Spool = request.app.state.spool
        beat = spool.read_heartbeat()
        supervision = spool.read_supervision()
        problem = serving_problem(beat, supervision, settings.heartbeat_timeout)
        info = {**(beat or {}), "status": "unavailable" if problem else "ok", "reason": problem,
                "queue_depth": spool.queue_depth(), "supervisor": supervision}
        return JSONResponse(Health.model_validate(info).model_dump(), status_code=503 if problem else 200)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        spool: Spool = request.app.state.spool
        beat = spool.read_heartbeat()
        fresh = heartbeat_problem(beat, settings.heartbeat_timeout) is None
        metrics.queue_depth.set(spool.queue_depth())
        metrics.active.set(beat.get("active", 0) if fresh else 0)
        metrics.prompt_cache_tokens.set((beat.get("prompt_cache_tokens") or 0) if fresh else 0)
        metrics.speculation(beat.get("speculation") if fresh else None)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
