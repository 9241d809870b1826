"""Layout Diffusion for Blender: label proxy objects, generate an image from the camera.

The data path, one package per step: the Blender scene is projected into a Layout
(``blender/``, on the pure ``core/``), sent to the engine process (``client/``), and the image
comes back into the artist's view (``ui/``) or a render layer (``render/``). ``wire`` is the
engine's own schema and protocol package, shared by both sides.

Importing this package does not import bpy: ``core``, ``client`` and ``wire`` stay usable
outside Blender. The Blender classes load in :func:`register`.
"""

from __future__ import annotations

import atexit
import importlib
from types import ModuleType

from .client import engine_session

_MODULES = (
    "ui.props",
    "ui.preferences",
    "ui.operators",
    "ui.panels",
    "ui.results",
    "ui.overlay",
    "render.engine",
)


def _modules() -> list[ModuleType]:
    # lazy: these import bpy, which importing the package must not
    return [importlib.import_module(f".{name}", __name__) for name in _MODULES]


_registered = False


def register() -> None:
    """Register properties, preferences, operators, panels, the camera overlay and the render
    engine."""
    global _registered
    for module in _modules():
        module.register()
    _registered = True


def unregister() -> None:
    """Undo :func:`register` and stop the engine process if one runs."""
    global _registered
    _registered = False
    for module in reversed(_modules()):
        module.unregister()
    engine_session.shutdown()


@atexit.register
def _unregister_at_exit() -> None:
    # Blender disables its add-ons before Python ends; a script that registered this package
    # itself (the batch renderer on the bpy module) must too: the bpy 4.2 module crashes at
    # exit while properties with Python getters are still registered.
    if _registered:
        unregister()
