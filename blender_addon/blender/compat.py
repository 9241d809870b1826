"""What differs between the Blender versions the add-on supports (4.2 LTS, 4.5 LTS, 5.x).

Each helper asks Blender for the feature it needs rather than comparing version numbers, so a
point release that backports or renames something keeps working.
"""

from __future__ import annotations

MULTILAYER_EXR = "OPEN_EXR_MULTILAYER"


def set_file_format(settings, file_format: str) -> None:
    """Set ``ImageFormatSettings.file_format``, also to multilayer EXR, on every version.

    Blender 5.0 splits the choice in two: ``media_type`` (image, multilayer image, video) must
    name the kind first, or the format is refused. 4.x has no ``media_type`` and takes the
    format alone.
    """
    if hasattr(settings, "media_type"):
        settings.media_type = "MULTI_LAYER_IMAGE" if file_format == MULTILAYER_EXR else "IMAGE"
    settings.file_format = file_format


def new_material_nodes(material):
    """The node tree of a new material, created where Blender does not do it (before 5.0)."""
    if material.node_tree is None:
        material.use_nodes = True
    return material.node_tree
