"""Wake-ups when entries in a directory appear or change: Linux inotify through ctypes."""

from __future__ import annotations

import ctypes
import os
import select
import struct
import weakref
from pathlib import Path

# From <sys/inotify.h>; the values are the same on every Linux architecture.
_IN_MODIFY = 0x2
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of NUL-padded name


class DirWatch:
    """An inotify watch on one directory."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # The fd lives as long as the object; no explicit close for callers to forget.
        weakref.finalize(self, os.close, fd)

    def fileno(self) -> int:
        """For an event loop's add_reader: readable when changes are pending."""
        return self._fd

    def changed(self) -> set[str]:
        """Names (up to the first dot) of the entries changed since the last call; never blocks."""
        names = set()
        try:
            while data := os.read(self._fd, 65536):
                pos = 0
                while pos < len(data):
                    _, _, _, size = _EVENT.unpack_from(data, pos)
                    name = data[pos + _EVENT.size:pos + _EVENT.size + size].rstrip(b"\0")
                    names.add(os.fsdecode(name).split(".", 1)[0])
                    pos += _EVENT.size + size
        except BlockingIOError:
            pass
        return names

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` s for a change; True if one came (pending changes are dropped)."""
        ready, _, _ = select.select([self._fd], [], [], max(timeout, 0.0))
        self.changed()
        return bool(ready)


def watch_dir(path: Path, *, writes: bool = False) -> DirWatch | None:
    """A watch on entries created or renamed into `path` (and written to, with `writes`),
    or None where inotify is unavailable, so callers poll instead."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        return None
    fd = init(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        return None
    mask = _IN_CREATE | _IN_MOVED_TO | (_IN_MODIFY if writes else 0)
    if add(fd, os.fsencode(path), ctypes.c_uint32(mask)) < 0:
        os.close(fd)
        return None
    return DirWatch(fd)
