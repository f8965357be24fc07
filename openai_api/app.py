"""The FastAPI app: lifespan (tokenizer, spool) and thin routes."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from mlx_lm.utils import load_config, load_tokenizer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from config import Settings, load_settings
from models import resolve_model, served_name
from openai_api.errors import ERROR_RESPONSES, APIError, install_error_handlers
from openai_api.events import StreamWaker, heartbeat_problem
from openai_api.metrics import Metrics
from openai_api.middleware import FrontDoor
from openai_api.schemas import (
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, Health, ModelCard, ModelList,
)
from openai_api.submit import chat_tokens, generate
from spool import Spool

log = logging.getLogger(__name__)

# s between re-reads of a stream file inotify said nothing about: only a safety net (an
# overflowed event queue), and every waiting request pays for each look.
INOTIFY_RECHECK = 1.0
_STREAMED = {200: {"content": {"text/event-stream": {}}}}


def _vocab_size(model_path: Path, tokenizer: Any) -> int:
    """The width of the model's logits, which sampling fields are checked against."""
    config = load_config(model_path)
    return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or len(tokenizer.vocab)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the tokenizer and open the spool."""
    settings: Settings = app.state.settings
    model_path = resolve_model(settings.model_repo, settings.model_cache_dir)
    app.state.tokenizer = load_tokenizer(Path(model_path))
    app.state.vocab_size = _vocab_size(Path(model_path), app.state.tokenizer)
    app.state.model_id = served_name(settings.model_repo)
    app.state.spool = Spool(settings.spool_dir)
    app.state.waker = StreamWaker(app.state.spool, recheck=INOTIFY_RECHECK)
    app.state.started = int(time.time())
    log.info("serving model %s (tokenizer from %s), spool %s", app.state.model_id, model_path, settings.spool_dir)
    yield
    app.state.waker.close()


def _check_model(request: Request, model: str) -> None:
    served = request.app.state.model_id
    if model != served:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served}'",
                       param="model", code="model_not_found")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The HTTP front for `settings` (default: read from the environment)."""
    settings = settings or load_settings()
    metrics = Metrics()
    app = FastAPI(title="mlx-ring", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(FrontDoor, api_key=settings.api_key, max_bytes=settings.max_request_bytes,
                       metrics=metrics)
    install_error_handlers(app)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**ERROR_RESPONSES, **_STREAMED})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        _check_model(request, body.model)
        return await generate(request, body, chat_tokens(request.app.state.tokenizer, body))

    @app.post("/v1/completions", response_model=Completion, responses={**ERROR_RESPONSES, **_STREAMED})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check_model(request, body.model)
        return await generate(request, body, request.app.state.tokenizer.encode(body.prompt))

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        return ModelList(data=[ModelCard(id=request.app.state.model_id, created=request.app.state.started)])

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health(request: Request) -> Any:
        spool: Spool = request.app.state.spool
        beat = spool.read_heartbeat()
        problem = heartbeat_problem(beat, settings.heartbeat_timeout)
        if problem is None and beat.get("state") != "ready":
            problem = f"ring state is {beat.get('state')!r}"
            problem += f": {beat['reason']}" if beat.get("reason") else ""
        info = {**(beat or {}), "status": "unavailable" if problem else "ok", "reason": problem,
                "queue_depth": spool.queue_depth()}
        return JSONResponse(Health.model_validate(info).model_dump(), status_code=503 if problem else 200)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        spool: Spool = request.app.state.spool
        beat = spool.read_heartbeat()
        fresh = heartbeat_problem(beat, settings.heartbeat_timeout) is None
        metrics.queue_depth.set(spool.queue_depth())
        metrics.active.set(beat.get("active", 0) if fresh else 0)
        metrics.prompt_cache_tokens.set((beat.get("prompt_cache_tokens") or 0) if fresh else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
