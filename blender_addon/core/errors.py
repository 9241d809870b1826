"""The add-on's one error for problems the artist can fix (the engine's own errors are
:class:`~..client.engine_client.EngineError`)."""

from __future__ import annotations


class UserError(Exception):
    """Something the artist can fix; the message says what and how."""
