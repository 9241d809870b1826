"""Properties: ``Object.layout_diffusion`` (the label) and ``Scene.layout_diffusion`` (settings).

These names are stable: saved blend files and scripts refer to them.
"""

from __future__ import annotations

import re

import bpy
from bpy.props import (
    BoolProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from .layout import Layout

_DEFAULTS = Layout(prompt="")


def readable_name(name: str) -> str:
    """A prompt guessed from an object name: ``"golden_retriever.001"`` -> ``"golden retriever"``.

    Blender's numeric duplicate suffix goes, underscores/dashes/dots become spaces, camelCase
    splits, and the result is lower case.
    """
    text = re.sub(r"\.\d+$", "", name)
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text)
    text = re.sub(r"[_\-.]+", " ", text)
    return re.sub(r"\s+", " ", text).strip().lower()


def model_spec(settings) -> str:
    """The scene's model setting as the engine needs it: blend-relative paths made absolute."""
    model = settings.model.strip()
    return bpy.path.abspath(model) if model.startswith("//") else model


def _get_prompt(self) -> str:
    # An empty stored prompt means "not edited yet": show the name-derived default, which
    # follows renames until the artist types their own.
    return self.prompt_text or readable_name(getattr(self.id_data, "name", ""))


def _set_prompt(self, value: str) -> None:
    self.prompt_text = value.strip()


class LayoutDiffusionObjectSettings(bpy.types.PropertyGroup):
    """An object's label: whether it takes part, what it should become, and how strongly."""

    enabled: BoolProperty(
        name="Label",
        description="Generate this object's prompt where the object stands in the camera view",
        default=False,
    )
    prompt: StringProperty(
        name="Prompt",
        description="What this object should become (defaults to a readable form of its name)",
        get=_get_prompt,
        set=_set_prompt,
    )
    prompt_text: StringProperty(
        name="Prompt Text",
        description="The prompt as typed; empty uses the object name",
        options={"HIDDEN"},
    )
    weight: FloatProperty(
        name="Weight",
        description="Strength of this object's prompt inside its mask (0 turns it off)",
        default=1.0,
        min=0.0,
        max=10.0,
        soft_max=3.0,
    )


class LayoutDiffusionSceneSettings(bpy.types.PropertyGroup):
    """Scene-wide generation settings; the image size comes from the render settings."""

    prompt: StringProperty(
        name="Prompt", description="The whole scene, e.g. 'a street at dusk, photo'", default=""
    )
    negative_prompt: StringProperty(
        name="Negative Prompt", description="What the image should not show", default=""
    )
    background_prompt: StringProperty(
        name="Background Prompt",
        description=(
            "What pixels outside every labeled object show; empty uses the scene prompt with "
            "the objects' prompts removed"
        ),
        default="",
    )
    base_ratio: FloatProperty(
        name="Base Ratio",
        description="How much of the scene prompt blends into each object's area",
        default=_DEFAULTS.base_ratio,
        min=0.0,
        max=1.0,
        subtype="FACTOR",
    )
    model: StringProperty(
        name="Model",
        description=(
            "SDXL model: a diffusers folder, a cached Hugging Face repo id, a .safetensors "
            "file (// paths are relative to the blend file), or 'shapes' (the small bundled "
            "model)"
        ),
        default="shapes",
    )
    seed: IntProperty(name="Seed", default=_DEFAULTS.seed, min=0)
    seed_mode: EnumProperty(
        name="Seed Mode",
        description="How animation frames pick their seed",
        items=(
            ("SHOT", "Per Shot", "Every frame uses the seed: steadier animations"),
            ("FRAME", "Per Frame", "Frame N uses seed + N: each frame varies"),
        ),
        default="SHOT",
    )
    steps: IntProperty(
        name="Steps", description="Denoising steps", default=_DEFAULTS.steps, min=1, max=1000
    )
    guidance_scale: FloatProperty(
        name="Guidance",
        description="Classifier-free guidance scale: how literally prompts are followed",
        default=_DEFAULTS.guidance_scale,
        min=0.0,
        max=100.0,
        soft_max=15.0,
    )
    show_overlay: BoolProperty(
        name="Show Boxes",
        description="Draw the last generation's boxes and labels in the camera view",
        default=True,
    )
    use_as_camera_background: BoolProperty(
        name="Camera Background",
        description="Show the generated image as the active camera's background image",
        default=False,
    )


CLASSES = (LayoutDiffusionObjectSettings, LayoutDiffusionSceneSettings)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Object.layout_diffusion = PointerProperty(type=LayoutDiffusionObjectSettings)
    bpy.types.Scene.layout_diffusion = PointerProperty(type=LayoutDiffusionSceneSettings)


def unregister() -> None:
    del bpy.types.Scene.layout_diffusion
    del bpy.types.Object.layout_diffusion
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
