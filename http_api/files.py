"""OpenAI's Files API, for batch input and output files: thin routes over spool/files.py."""

from __future__ import annotations

import asyncio
from typing import Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.datastructures import UploadFile

from http_api.errors import ERROR_RESPONSES, APIError, stored_or_404
from spool.batches import ENDED, BatchStore
from spool.files import FileObject, FileStore, check_file_id

router = APIRouter()
UPLOAD_PATH = "/v1/files"
_FORM_FIELDS = {"file", "purpose"}


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


def _store(request: Request) -> FileStore:
    return FileStore(request.app.state.settings.spool_dir)


def file_or_404(store: FileStore, file_id: str) -> FileObject:
    return stored_or_404(store.get, check_file_id, "File", file_id)


@router.post(UPLOAD_PATH, response_model=FileObject, responses=ERROR_RESPONSES)
async def upload_file(request: Request) -> FileObject:
    """A JSONL file of batch requests (multipart: `file`, `purpose=batch`); its lines are
    checked when a batch is created from it."""
    limit_mb = request.app.state.settings.max_batch_file_mb
    async with request.form(max_files=1, max_fields=8) as form:
        if unknown := sorted(set(form) - _FORM_FIELDS):
            raise APIError(400, f"unsupported field: {unknown[0]}", param=unknown[0], code="invalid_value")
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose != "batch":
            raise APIError(400, f"purpose must be 'batch'; got {purpose!r}", param="purpose", code="invalid_value")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "file: a file is required", param="file", code="invalid_value")
        data = await upload.read(limit_mb * 2**20 + 1)
    if len(data) > limit_mb * 2**20:
        raise APIError(413, f"file larger than MAX_BATCH_FILE_MB ({limit_mb} MB)", param="file",
                       code="file_too_large")
    if not data.strip():
        raise APIError(400, "the file is empty", param="file", code="invalid_value")
    return await asyncio.to_thread(_store(request).create, upload.filename or "upload.jsonl", "batch", data)


@router.get(UPLOAD_PATH, response_model=FileList)
async def list_files(request: Request, purpose: Optional[str] = None, after: Optional[str] = None,
                     limit: int = Query(10_000, ge=1, le=10_000),
                     order: Literal["asc", "desc"] = "desc") -> FileList:
    files = [f for f in _store(request).all() if purpose is None or f.purpose == purpose]
    if order == "asc":
        files.reverse()
    if after is not None:
        ids = [f.id for f in files]
        files = files[ids.index(after) + 1:] if after in ids else []
    page = files[:limit]
    return FileList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                    has_more=len(files) > limit)


@router.get(UPLOAD_PATH + "/{file_id}", response_model=FileObject, responses=ERROR_RESPONSES)
async def get_file(request: Request, file_id: str) -> FileObject:
    return file_or_404(_store(request), file_id)


@router.get(UPLOAD_PATH + "/{file_id}/content", response_class=FileResponse, responses=ERROR_RESPONSES)
async def file_content(request: Request, file_id: str) -> FileResponse:
    store = _store(request)
    found = file_or_404(store, file_id)
    return FileResponse(store.content_path(found.id), media_type="application/octet-stream",
                        filename=found.filename)


@router.delete(UPLOAD_PATH + "/{file_id}", response_model=FileDeleted, responses=ERROR_RESPONSES)
async def delete_file(request: Request, file_id: str) -> FileDeleted:
    store = _store(request)
    found = file_or_404(store, file_id)
    running = [b.id for b in BatchStore(request.app.state.settings.spool_dir).all()
               if b.input_file_id == found.id and b.status not in ENDED]
    if running:
        raise APIError(400, f"the file is the input of batch {running[0]}, which has not ended", param="file_id",
                       code="file_in_use")
    store.delete(found.id)
    return FileDeleted(id=found.id)
