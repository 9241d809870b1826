"""Drives a real ``python -m engine serve`` subprocess with timeouts, for tests.

Every stdout line must be a JSON object (the protocol allows nothing else); a line that is not
is kept in ``stray_lines`` so tests can assert there are none. A hung engine fails the waiting
test with a timeout instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def engine_env(**extra: str) -> dict[str, str]:
    """The environment for an engine subprocess: offline, importable from the checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class EngineClient:
    """A running ``engine serve`` process: send requests, wait for events."""

    def __init__(self, *args: str, stderr_path: str | os.PathLike[str], env: dict | None = None):
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.stderr_path = str(stderr_path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=ROOT,
            env=env or engine_env(),
        )
        self.events: queue.Queue[dict | None] = queue.Queue()
        self.stray_lines: list[str] = []
        self.seen: list[dict] = []
        self._backlog: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                message = json.loads(line)
            except ValueError:
                self.stray_lines.append(line)
                continue
            if not isinstance(message, dict):
                self.stray_lines.append(line)
                continue
            self.events.put(message)
        self.events.put(None)

    def send_line(self, line: str) -> None:
        """Write one raw line to the engine's stdin."""
        self.proc.stdin.write(line.encode("utf-8") + b"\n")
        self.proc.stdin.flush()

    def send(self, request: dict[str, Any]) -> None:
        """Write one request (NaN allowed, to test how the engine answers it)."""
        self.send_line(json.dumps(request))

    def next_event(self, timeout: float = 60.0) -> dict:
        """The next line the engine wrote; fails after ``timeout`` seconds or at its exit."""
        try:
            message = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"engine wrote nothing for {timeout} s; stderr:\n{self.stderr_tail()}"
            ) from None
        if message is None:
            self.events.put(None)
            raise AssertionError(
                f"engine exited ({self.proc.poll()}); stderr:\n{self.stderr_tail()}"
            )
        self.seen.append(message)
        return message

    def until(self, request_id: Any, events: set[str], timeout: float = 120.0) -> list[dict]:
        """Every event for ``request_id`` up to and including one whose kind is in ``events``.

        Events for other ids are set aside for later calls about those ids.
        """
        deadline = time.monotonic() + timeout
        collected = []
        while True:
            mine = [m for m in self._backlog if m.get("id") == request_id]
            if mine:
                message = mine[0]
                self._backlog.remove(message)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {events} for id {request_id!r} within {timeout} s")
                message = self.next_event(left)
                if message.get("id") != request_id:
                    self._backlog.append(message)
                    continue
            collected.append(message)
            if message.get("event") in events:
                return collected

    def request(self, request: dict[str, Any], timeout: float = 120.0) -> dict:
        """Send a request and return its final reply (result, error, ack, hello, cancelled)."""
        self.send(request)
        final = {"result", "error", "ack", "hello", "cancelled"}
        return self.until(request["id"], final, timeout)[-1]

    def stderr_tail(self, chars: int = 4000) -> str:
        """The end of the engine's log."""
        self._stderr.flush()
        return Path(self.stderr_path).read_text(errors="replace")[-chars:]

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit; its status."""
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        """Stop the process if it still runs (closing stdin first, then killing)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._stderr.close()
