"""Layout Diffusion for Blender: label proxy objects, generate an image from the camera.

The add-on projects every labeled object through the active camera into a region (box, mask,
depth), writes a Layout and hands it to the local engine, which runs in its own Python.

Importing this package does not import bpy: the pure modules (``engine_client``, ``layout``,
``io``) stay usable outside Blender. Blender classes load in :func:`register`.
"""

from __future__ import annotations

_MODULES = ("props", "preferences", "operators", "ui", "overlay", "render_engine")


def _modules() -> list:
    import importlib

    return [importlib.import_module(f".{name}", __name__) for name in _MODULES]


def register() -> None:
    """Register properties, preferences, operators, panels, the camera overlay and the render
    engine."""
    for module in _modules():
        module.register()


def unregister() -> None:
    """Undo :func:`register` and stop the engine process if one runs."""
    for module in reversed(_modules()):
        module.unregister()
    from . import engine_session

    engine_session.shutdown()
