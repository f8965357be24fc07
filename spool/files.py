"""Uploaded and produced files (OpenAI's Files API), kept under the spool directory.

Layout under `<spool>/files/` (directories 0700, files 0600, as the spool's):

    <id>.json    the file's record (FileObject), written last: a file exists once it has one
    <id>.data    its content

Ids are checked against a strict pattern before any path is built from them.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel

from spool.queue import make_dir, write_atomic

_FILE_ID = re.compile(r"file-[0-9a-f]{24}")

Purpose = Literal["batch", "batch_output"]


class FileObject(BaseModel):
    """OpenAI's file object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Purpose
    status: Literal["processed"] = "processed"
    expires_at: Optional[int] = None


def check_file_id(file_id: str) -> str:
    """`file_id` if it is a well-formed file id, else ValueError."""
    if not isinstance(file_id, str) or not _FILE_ID.fullmatch(file_id):
        raise ValueError(f"invalid file id: {file_id!r}")
    return file_id


def derived_file_id(source: str, role: str) -> str:
    """The id of a file made for `source` (a batch's output or errors): the same every
    time, so a batch finalized again after a crash publishes the same file once."""
    return "file-" + hashlib.sha256(f"{source}:{role}".encode()).hexdigest()[:24]


class FileStore:
    def __init__(self, spool_root: Path) -> None:
        self.root = make_dir(Path(spool_root) / "files")
        self._tmp = make_dir(Path(spool_root) / "tmp")

    def _record(self, file_id: str) -> Path:
        return self.root / f"{check_file_id(file_id)}.json"

    def content_path(self, file_id: str) -> Path:
        return self.root / f"{check_file_id(file_id)}.data"

    def create(self, filename: str, purpose: Purpose, data: bytes) -> FileObject:
        """Store an upload durably; its record."""
        file_id = f"file-{time.time_ns() // 1000:014x}{secrets.token_hex(5)}"  # sorts by creation
        write_atomic(self._tmp, self.content_path(file_id), data, durable=True)
        return self._publish(file_id, filename, purpose, len(data))

    def adopt(self, file_id: str, filename: str, purpose: Purpose, content: Path) -> FileObject:
        """Make the finished file `content` (on the same file system) the file `file_id`.
        Idempotent: once adopted, the file is returned as it is."""
        if (existing := self.get(file_id)) is not None:
            return existing
        os.replace(content, self.content_path(file_id))
        return self._publish(file_id, filename, purpose, self.content_path(file_id).stat().st_size)

    def _publish(self, file_id: str, filename: str, purpose: Purpose, size: int) -> FileObject:
        record = FileObject(id=file_id, bytes=size, created_at=int(time.time()), filename=filename, purpose=purpose)
        write_atomic(self._tmp, self._record(file_id), record.model_dump_json().encode(), durable=True)
        return record

    def get(self, file_id: str) -> FileObject | None:
        try:
            return FileObject.model_validate_json(self._record(file_id).read_bytes())
        except FileNotFoundError:
            return None

    def all(self) -> list[FileObject]:
        """Every file, newest first."""
        records = []
        for name in os.listdir(self.root):
            if name.endswith(".json") and _FILE_ID.fullmatch(name[:-5]) and (record := self.get(name[:-5])):
                records.append(record)
        return sorted(records, key=lambda f: (f.created_at, f.id), reverse=True)

    def delete(self, file_id: str) -> bool:
        """Remove a file (its record first, so it is never half there); False if none."""
        try:
            self._record(file_id).unlink()
        except FileNotFoundError:
            return False
        self.content_path(file_id).unlink(missing_ok=True)
        return True
