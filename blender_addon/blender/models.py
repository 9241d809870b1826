"""Model settings as the engine reads them."""

from __future__ import annotations

import bpy


def model_spec(settings, name: str = "model") -> str:
    """A model setting (``model``, ``controlnet``, ``ip_adapter``, ``gligen``) as the engine
    needs it: blend-relative paths made absolute."""
    model = getattr(settings, name).strip()
    return bpy.path.abspath(model) if model.startswith("//") else model
