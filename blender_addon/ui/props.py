"""Properties: ``Object.layout_diffusion`` (the label) and ``Scene.layout_diffusion`` (settings).

These names are stable: saved blend files and scripts refer to them. Defaults of settings that
are Layout fields come from the Layout itself, so the add-on and the engine agree on them.
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

from ..wire.cost import HIGH_RES_STRENGTH
from ..wire.layout import Layout, Region

_DEFAULTS = Layout(prompt="")
_REGION_DEFAULTS = Region(prompt="", box=(0.0, 0.0, 1.0, 1.0))

INIT_SOURCES = (
    ("NONE", "None", "Generate from noise"),
    ("RESULT", "Last Result", "Start from the last generated image"),
    ("IMAGE", "Image", "Start from an image in the blend file (a painted plate, a photo)"),
    (
        "PROXIES",
        "Proxy Render",
        "Start from the proxies seen from the camera, each in one flat colour (its label's colour "
        "word, else its material's)",
    ),
    (
        "LAYERS",
        "Object Layers",
        "Start from the objects' Reference Images, each fitted into the object's box and cut to "
        "its visible part (an RGBA image's alpha cuts it out), over the proxy render",
    ),
)
"""New sources go last: blend files store the chosen item by its position."""


PATH_OPTIONS = {"ANIMATABLE"} | (
    {"PATH_SUPPORTS_BLEND_RELATIVE"}
    if "is_path_supports_blend_relative" in bpy.types.Property.bl_rna.properties
    else set()
)
"""Options of the model path fields (Blender's default, ANIMATABLE, kept): from Blender 4.5 on, the file browser keeps a picked path
relative to the blend file (``//``) only for properties that say they support it; the add-on
resolves such paths (:func:`..blender.models.model_spec`). Older versions have no such option."""


def readable_name(name: str) -> str:
    """A prompt guessed from an object name: ``"golden_retriever.001"`` -> ``"golden retriever"``.

    Blender's numeric duplicate suffix goes, underscores/dashes/dots become spaces, camelCase
    splits, and the result is lower case.
    """
    text = re.sub(r"\.\d+$", "", name)
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text)
    text = re.sub(r"[_\-.]+", " ", text)
    return re.sub(r"\s+", " ", text).strip().lower()


def _factor(name: str, description: str, default: float):
    """A 0..1 slider property."""
    return FloatProperty(
        name=name, description=description, default=default, min=0.0, max=1.0, subtype="FACTOR"
    )


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
    strength: _factor(
        name="Strength",
        description=(
            "With an init image: 0 keeps the init image's pixels for this object, 1 "
            "regenerates it freely"
        ),
        default=1.0,
    )
    reference_image: PointerProperty(
        name="Reference Image",
        type=bpy.types.Image,
        description=(
            "What this object should look like (needs an IP-Adapter, sidebar > Conditions); "
            "applied inside the object's mask only. With Init Image set to Object Layers it is "
            "also the object's layer in the init image (an RGBA image's alpha cuts it out)"
        ),
    )
    reference_image_scale: FloatProperty(
        name="Image Scale",
        description="How strongly the reference image shapes the object (0 ignores it)",
        default=_REGION_DEFAULTS.image_scale,
        min=0.0,
        max=5.0,
        soft_max=1.5,
    )
    use_depth_scale: BoolProperty(
        name="Own Depth Scale",
        description="Give this object its own depth-follow scale instead of the scene's",
        default=False,
    )
    depth_scale: FloatProperty(
        name="Depth Follow",
        description=(
            "How closely the object keeps the proxy's shape (depth ControlNet scale inside its "
            "mask; 0 lets it leave the proxy's shape)"
        ),
        default=1.0,
        min=0.0,
        max=5.0,
        soft_max=2.0,
    )


class LayoutDiffusionSceneSettings(bpy.types.PropertyGroup):
    """Scene-wide generation settings; the image size comes from the render settings."""

    prompt: StringProperty(
        name="Scene Prompt",
        description="The whole scene, e.g. 'a street at dusk, photo'",
        default="",
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
    base_ratio: _factor(
        name="Base Ratio",
        description="How much of the scene prompt blends into each object's area",
        default=_DEFAULTS.base_ratio,
    )
    model: StringProperty(
        name="Model",
        description=(
            "SDXL model: a diffusers folder or a .safetensors file (browse, or type a path; // "
            "paths are relative to the blend file), a cached Hugging Face repo id, or 'shapes' "
            "(the small bundled model)"
        ),
        default="shapes",
        subtype="FILE_PATH",
        options=PATH_OPTIONS,
    )
    model_config: StringProperty(
        name="Model Config",
        description=(
            "For a single .safetensors model file: a diffusers folder or a cached Hugging Face "
            "repo id with the configs and tokenizers of the same architecture; empty: the "
            "repo the file's weights point to (SDXL base for most fine-tunes), from the cache"
        ),
        default="",
        subtype="DIR_PATH",
        options=PATH_OPTIONS,
    )
    seed: IntProperty(
        name="Seed",
        description="Starting noise: the same seed and settings give the same image",
        default=_DEFAULTS.seed,
        min=0,
    )
    use_random_seed: BoolProperty(
        name="Random Seed",
        description=(
            "Each Generate from Camera draws a new seed (shown as the last result's seed, so "
            "it can be reproduced). Renders (F12, Ctrl-F12, the batch renderer) always use Seed "
            "and Animation Seeds, so every frame can be rendered again"
        ),
        default=False,
    )
    seed_mode: EnumProperty(
        name="Animation Seeds",
        description="How rendered animation frames pick their seed from Seed",
        items=(
            ("SHOT", "Same Every Frame", "Every frame uses Seed: steadier animations"),
            ("FRAME", "Per Frame", "Frame N uses Seed + N: each frame varies"),
        ),
        default="SHOT",
    )
    steps: IntProperty(
        name="Steps", description="Denoising steps", default=_DEFAULTS.steps, min=1, max=1000
    )
    use_high_res_fix: BoolProperty(
        name="High-res Fix",
        description=(
            "Far above the model's native size (more than 1.5 times its area): generate at "
            "about the native size first, then at the full size from that image, upscaled, at "
            "High-res Strength, the regions kept. Composes like the model was trained and "
            "costs fewer full-size steps"
        ),
        default=True,
    )
    high_res_strength: FloatProperty(
        name="High-res Strength",
        description=(
            "How freely the full-size pass of the High-res Fix repaints the upscaled first "
            "pass: low keeps its composition, high adds more detail (and runs more steps)"
        ),
        default=HIGH_RES_STRENGTH,
        min=0.05,
        max=1.0,
        subtype="FACTOR",
    )
    guidance_scale: FloatProperty(
        name="CFG Scale",
        description="Classifier-free guidance scale: how literally prompts are followed",
        default=_DEFAULTS.guidance_scale,
        min=0.0,
        max=100.0,
        soft_max=15.0,
    )
    mode: EnumProperty(
        name="Region Mode",
        description="How each object's prompt is held to its area",
        items=(
            (
                "ATTENTION",
                "Attention",
                "Mask each prompt's cross-attention to its object: about the cost of one image",
            ),
            (
                "LATENT",
                "Latent",
                "Denoise each object with its own model call and blend by masks: stronger "
                "separation, about (R + 3) / 2 times the time for R objects",
            ),
        ),
        default=_DEFAULTS.mode.upper(),
    )
    use_reference: BoolProperty(
        name="Reference Pull",
        description=(
            "Pull the first steps toward an image that already has the layout (the proxy "
            "render, or a pass the engine makes first), so each object keeps its place and colour"
        ),
        default=False,
    )
    reference_source: EnumProperty(
        name="Pull Toward",
        description="The image whose layout the first steps are pulled toward",
        items=(
            (
                "PROXIES",
                "Proxy Render",
                "The proxies from the camera, each in one flat colour (its label's colour word, "
                "else its material's)",
            ),
            (
                "ENGINE",
                "Engine Pass",
                "An image the engine makes first from the boxes and labels: with GLIGEN when a "
                "GLIGEN model is set (Conditions panel), else a half-size regional pass",
            ),
        ),
        default="PROXIES",
    )
    reference_scale: FloatProperty(
        name="Pull Strength",
        description=(
            "Strength of the pull toward the proxy render: 0.25 goes halfway each step, 0.5 "
            "all the way"
        ),
        default=0.25,
        min=0.0,
        max=10.0,
        soft_max=1.0,
    )
    use_model_fraction: BoolProperty(
        name="Model's Pull Fraction",
        description=(
            "Let the model choose how many steps the proxy render pulls (0.1 of them for "
            "SDXL; a model can recommend its own, the shipped shapes model 0.4)"
        ),
        default=_DEFAULTS.reference_fraction is None,
    )
    reference_fraction: _factor(
        name="Pull Fraction",
        description="Fraction of the steps, from the first, during which the proxy render pulls",
        default=0.1,
    )
    init_source: EnumProperty(
        name="Init Image",
        description="Image to start from; each object keeps it according to its Strength",
        items=INIT_SOURCES,
        default="NONE",
    )
    init_image: PointerProperty(
        name="Image",
        type=bpy.types.Image,
        description="The image to start from when Init Image is Image",
    )
    strength: _factor(
        name="Background Strength",
        description=(
            "With an init image: how freely pixels outside every object are regenerated "
            "(0 keeps the init image, 1 ignores it)"
        ),
        default=_DEFAULTS.strength,
    )
    use_init_previous: BoolProperty(
        name="Start From Previous Frame",
        description=(
            "Rendered animations (Ctrl-F12): each frame after the first starts from the "
            "previous frame's image, to reduce flicker, as the batch renderer's --init-previous "
            "does; it replaces the Init Image for those frames"
        ),
        default=False,
    )
    init_previous_strength: _factor(
        name="Previous Frame Strength",
        description=(
            "With Start From Previous Frame: how freely each frame is regenerated from the "
            "previous one (0 keeps it, 1 ignores it)"
        ),
        default=0.6,
    )
    controlnet: StringProperty(
        name="Depth ControlNet",
        description=(
            "SDXL depth ControlNet that makes the image follow the proxies' depth: a diffusers "
            "folder, a cached Hugging Face repo id or a .safetensors file (// paths are relative "
            "to the blend file); empty: no depth conditioning"
        ),
        default="",
        subtype="FILE_PATH",
        options=PATH_OPTIONS,
    )
    depth_scale: FloatProperty(
        name="Depth Scale",
        description="How closely the image follows the proxies' depth (0 turns it off)",
        default=_DEFAULTS.depth_scale,
        min=0.0,
        max=5.0,
        soft_max=2.0,
    )
    depth_start: _factor(
        name="Depth Start",
        description="Fraction of the steps after which depth conditioning starts",
        default=_DEFAULTS.depth_start,
    )
    depth_end: _factor(
        name="Depth End",
        description="Fraction of the steps after which depth conditioning stops",
        default=_DEFAULTS.depth_end,
    )
    ip_adapter: StringProperty(
        name="IP-Adapter",
        description=(
            "SDXL IP-Adapter that applies objects' reference images: a weights file, a folder "
            "holding one, or a cached repo id such as h94/IP-Adapter; empty: reference images "
            "cannot be used"
        ),
        default="",
        subtype="FILE_PATH",
        options=PATH_OPTIONS,
    )
    gligen: StringProperty(
        name="GLIGEN",
        description=(
            "GLIGEN model (SD 1.x, boxes and phrases) that makes the reference for the pull when "
            "Pull Toward is Engine Pass: a diffusers folder or a cached repo id such as "
            "masterful/gligen-1-4-generation-text-box; empty: a half-size regional pass makes it"
        ),
        default="",
        subtype="DIR_PATH",
        options=PATH_OPTIONS,
    )
    regenerate_seed: EnumProperty(
        name="Re-generate Seed",
        description="Which seed Re-generate Object uses",
        items=(
            ("NEXT", "Next", "The last result's seed + 1"),
            ("RANDOM", "Random", "A random seed"),
        ),
        default="NEXT",
    )
    result_seed: IntProperty(
        name="Result Seed",
        description="Seed of the last result (Re-generate Object starts from it)",
        default=-1,
        min=-1,
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
    history_size: IntProperty(
        name="Keep Results",
        description=(
            "How many of the last results Generate keeps, each a PNG with how it was made "
            "(older ones are deleted)"
        ),
        default=10,
        min=1,
        max=1000,
        soft_max=100,
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
