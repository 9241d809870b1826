"""File-name pieces made from Blender names (objects, scenes)."""

from __future__ import annotations

import re


def safe_name(name: str, fallback: str = "object") -> str:
    """``name`` usable in a file name on every platform: runs of other characters become ``_``
    and leading or trailing dots and underscores go; ``fallback`` when nothing is left."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or fallback
