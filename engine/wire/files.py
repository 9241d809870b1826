"""Atomic file writes: a reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path`` that replaces ``path`` only once fully written.

    On leaving the block the file is flushed, fsynced and renamed onto ``path`` (atomic on one
    file system); if the block raises, the temporary file is removed and ``path`` is untouched.
    """
    path = os.path.abspath(path)
    tmp = os.path.join(
        os.path.dirname(path),
        f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp",
    )
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Write text to ``path`` so that readers see the old file or the whole new one."""
    with atomic_open(path) as handle:
        handle.write(text)
