"""Panels: the object's label (Object properties), the sidebar tab with Generate and the scene's
settings in the artist's order (prompt, image, regions, guidance, conditions, output), the camera
header, and Re-generate Object in the 3D View's object context menu."""

from __future__ import annotations

import bpy

from ..blender.camera import render_resolution
from ..blender.models import model_spec
from ..client import cost, engine_session
from ..core import places, request
from ..core.projection import size_change
from ..wire.cost import far_above_native
from . import operators, preferences

MAX_LISTED = 40
"""Labeled objects listed in the sidebar; the rest are counted (the list is for checking)."""


class OBJECT_PT_layout_diffusion(bpy.types.Panel):
    """Object properties > Proxy Label: whether the object is labeled, its prompt and weight, how
    much of an init image it keeps, its reference image, how closely it follows the proxy's
    depth, and Re-generate Object."""

    bl_label = places.OBJECT_PANEL
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "object"

    @classmethod
    def poll(cls, context) -> bool:
        return context.object is not None and context.object.type not in {"CAMERA", "LIGHT"}

    def draw_header(self, context) -> None:
        self.layout.prop(context.object.layout_diffusion, "enabled", text="")

    def draw(self, context) -> None:
        settings = context.object.layout_diffusion
        scene_settings = context.scene.layout_diffusion
        layout = self.layout
        layout.use_property_split = True
        layout.active = settings.enabled
        layout.prop(settings, "prompt")
        layout.prop(settings, "weight")
        col = layout.column()
        # Strength says how much of the init image to keep: without one it does nothing.
        col.active = scene_settings.init_source != "NONE"
        col.prop(settings, "strength")
        _image_field(layout, settings, "reference_image", "Reference Image")
        if settings.reference_image is not None:
            col = layout.column()
            spec = model_spec(scene_settings, "ip_adapter")
            available, message = engine_session.condition_state("ip_adapter", spec)
            col.active = available is not False
            col.prop(settings, "reference_image_scale")
            # As an Object Layers init image it needs no IP-Adapter.
            as_layer = scene_settings.init_source == "LAYERS"
            if as_layer:
                layout.label(text="This object's layer in the init image", icon="IMAGE_RGB_ALPHA")
            if available is not True and not (as_layer and not spec):
                col.label(text=message, icon="ERROR" if available is False else "INFO")
        row = layout.row(heading="Depth Follow")
        row.prop(settings, "use_depth_scale", text="")
        sub = row.row()
        sub.active = settings.use_depth_scale
        sub.prop(settings, "depth_scale", text="")
        # Named: the panel's object may be pinned, not the active one.
        op = layout.operator("layout_diffusion.regenerate_object", icon="FILE_REFRESH")
        op.object_name = context.object.name


def _image_field(layout, data, prop: str, text: str) -> None:
    """An image selector with New/Open buttons, labeled like the property-split rows around it
    (``template_ID`` takes no label of its own)."""
    split = layout.split(factor=0.4)
    split.alignment = "RIGHT"
    split.label(text=text)
    split.template_ID(data, prop, open="image.open")


class SidebarPanel:
    """Where every panel of the add-on's sidebar tab lives."""

    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = places.SIDEBAR_TAB


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
"""Model files that are one checkpoint: only these need a Model Config."""


def is_single_file(spec: str) -> bool:
    """Whether model ``spec`` names one checkpoint file (not a folder, repo id or alias)."""
    return spec.strip().lower().endswith(SINGLE_FILE_SUFFIXES)


class VIEW3D_PT_layout_diffusion(SidebarPanel, bpy.types.Panel):
    """Generate, its progress, the model, and a line naming the guidance in use."""

    bl_label = "Layout Diffusion"

    def draw(self, context) -> None:
        layout = self.layout
        scene = context.scene
        settings = scene.layout_diffusion
        run = operators.current_run()
        if run is None:
            layout.operator("layout_diffusion.generate", icon="RENDER_STILL")
        else:
            row = layout.row(align=True)
            row.progress(factor=run.fraction, type="BAR", text=run.status)
            row.operator("layout_diffusion.cancel", text="", icon="X")
        if scene.camera is None:
            layout.label(text="No camera: add one and set it as scene camera", icon="ERROR")
        for text, icon in cost_lines(scene):
            if icon == "ERROR":  # a long run is said before the Image panel is opened
                layout.label(text=text, icon=icon)
        col = layout.column()
        col.use_property_split = True
        col.prop(settings, "model")
        sub = col.column()
        # Configs matter only when the model is one checkpoint file.
        sub.active = is_single_file(settings.model)
        sub.prop(settings, "model_config")
        summary = guidance_summary(scene)
        if summary:
            layout.label(text=summary, icon="MODIFIER")


class VIEW3D_PT_layout_diffusion_prompt(SidebarPanel, bpy.types.Panel):
    """The scene's prompts: the whole picture, what to avoid, and what is outside the objects."""

    bl_label = places.PROMPT
    bl_parent_id = "VIEW3D_PT_layout_diffusion"

    def draw(self, context) -> None:
        settings = context.scene.layout_diffusion
        layout = self.layout
        layout.use_property_split = True
        layout.prop(settings, "prompt")
        layout.prop(settings, "negative_prompt")
        layout.prop(settings, "background_prompt")


def guidance_summary(scene) -> str:
    """One line naming the guidance and conditions in use (empty when none are), so the
    closed sub-panels do not hide them."""
    settings = scene.layout_diffusion
    parts = []
    if settings.mode == "LATENT":
        parts.append("Latent mode")
    if settings.use_reference:
        parts.append("proxy pull")
    if settings.init_source != "NONE":
        parts.append("init image")
    if settings.controlnet.strip():
        parts.append("depth")
    images = sum(
        1
        for ob in scene.objects
        if ob.layout_diffusion.enabled and ob.layout_diffusion.reference_image is not None
    )
    if images:
        parts.append(f"{images} reference image{'s' if images != 1 else ''}")
    text = ", ".join(parts)
    return text[:1].upper() + text[1:]


class VIEW3D_PT_layout_diffusion_settings(SidebarPanel, bpy.types.Panel):
    """The image: its size (from the render settings), seed and sampling."""

    bl_label = places.IMAGE
    bl_parent_id = "VIEW3D_PT_layout_diffusion"

    def draw(self, context) -> None:
        scene = context.scene
        settings = scene.layout_diffusion
        layout = self.layout
        layout.use_property_split = True
        draw_size_and_cost(layout, scene)
        col = layout.column()
        col.active = not settings.use_random_seed
        col.prop(settings, "seed")
        layout.prop(settings, "use_random_seed")
        if settings.use_random_seed and settings.result_seed >= 0:
            row = layout.row(align=True)
            row.label(text=f"Last result: seed {settings.result_seed}", icon="INFO")
            row.operator("layout_diffusion.use_result_seed", text="", icon="LOOP_BACK")
        layout.prop(settings, "seed_mode")
        layout.prop(settings, "steps")
        layout.prop(settings, "guidance_scale")


def cost_lines(scene) -> list[tuple[str, str]]:
    """``(text, icon)`` lines on what generating the scene costs: native and generated size,
    the estimate and the high-res fix (see ``client.cost.describe``)."""
    settings = scene.layout_diffusion
    width, height = size_change(*render_resolution(scene)).size
    known = cost.known(model_spec(settings))
    return cost.describe(
        known,
        width,
        height,
        settings.steps,
        settings.use_high_res_fix,
        settings.high_res_strength,
    )


def draw_size_and_cost(layout, scene) -> None:
    """The size generated at (and how it differs from the render resolution), the model's
    native size, the estimate, and the high-res fix when the size is far above native."""
    settings = scene.layout_diffusion
    change = size_change(*render_resolution(scene))
    width, height = change.size
    if change.changed:
        layout.label(text=change.message, icon="INFO")
    layout.label(text=f"{width} x {height} px (Output properties)", icon="IMAGE_DATA")
    spec = model_spec(settings)
    known = cost.known(spec)
    for text, icon in cost_lines(scene):
        layout.label(text=text, icon=icon)
    if known is None:
        task = cost.checking(spec)
        if task is not None and task.running:
            layout.label(text=f"Estimating: {task.status}", icon="SORTTIME")
        else:
            if task is not None and task.error:
                layout.label(text=f"No estimate: {task.error}", icon="ERROR")
            layout.operator("layout_diffusion.estimate_cost", icon="TIME")
        return
    if far_above_native(width, height, int(known["native_size"])):
        layout.prop(settings, "use_high_res_fix")
        sub = layout.column()
        sub.active = settings.use_high_res_fix
        sub.prop(settings, "high_res_strength")


def latent_cost(regions: int, base_ratio: float = 0.2) -> float:
    """Time of latent mode relative to attention mode for ``regions`` distinct object prompts,
    by the engine's formula (``MODES`` in :mod:`..wire.layout`): ``(R + 3) / 2``, or
    ``(R + 2) / 2`` when ``base_ratio`` 0 drops the scene prompt's call. The engine crops small
    regions, so this is an upper bound."""
    return (regions + (3 if base_ratio > 0 else 2)) / 2


def layer_count(scene) -> int:
    """Labeled objects with a Reference Image: the layers of an Object Layers init image."""
    return sum(
        1
        for ob in scene.objects
        if ob.layout_diffusion.enabled and ob.layout_diffusion.reference_image is not None
    )


class VIEW3D_PT_layout_diffusion_objects(SidebarPanel, bpy.types.Panel):
    """The labeled objects (prompts and weights editable in place), how each prompt is held to
    its region, and Re-generate Object."""

    bl_label = places.REGIONS
    bl_parent_id = "VIEW3D_PT_layout_diffusion"

    def draw(self, context) -> None:
        scene = context.scene
        settings = scene.layout_diffusion
        layout = self.layout
        row = layout.row(align=True)
        row.operator("layout_diffusion.label_selected", icon="ADD")
        row.operator("layout_diffusion.unlabel_selected", icon="REMOVE")
        labeled = [ob for ob in scene.objects if ob.layout_diffusion.enabled]
        if not labeled:
            layout.label(text="Select proxy objects and press Label Selected", icon="INFO")
        col = layout.column(align=True)
        for ob in labeled[:MAX_LISTED]:
            row = col.row(align=True)
            row.label(text=ob.name, icon="OBJECT_DATA")
            row.prop(ob.layout_diffusion, "prompt", text="")
            sub = row.row(align=True)
            sub.ui_units_x = 3
            sub.prop(ob.layout_diffusion, "weight", text="")
        if len(labeled) > MAX_LISTED:
            layout.label(text=f"... and {len(labeled) - MAX_LISTED} more")

        layout.separator()
        col = layout.column()
        col.use_property_split = True
        col.prop(settings, "mode", expand=True)
        if settings.mode == "LATENT":
            # Objects sharing a prompt share its model call.
            count = len({ob.layout_diffusion.prompt for ob in labeled})
            col.label(
                text=(
                    f"Up to {latent_cost(count, settings.base_ratio):.1f}x the time of "
                    f"Attention ({count} prompts)"
                ),
                icon="TIME",
            )
            if engine_session.has_capability("latent") is False:
                col.label(text="This engine has no latent mode: update it", icon="ERROR")
        col.prop(settings, "base_ratio")

        layout.separator()
        col = layout.column()
        col.use_property_split = True
        col.prop(settings, "regenerate_seed")
        if settings.result_seed >= 0:
            text = f"Last result: seed {settings.result_seed}"
            if settings.regenerate_seed == "NEXT":
                text += f", next {request.next_seed(settings)}"
            col.label(text=text, icon="INFO")
        # The operator accepts any object a script names; this button acts on the active one.
        target = operators.regenerate_target(context)
        row = layout.row()
        row.enabled = target is not None and target.layout_diffusion.enabled
        if target is None or not target.layout_diffusion.enabled:
            row.operator("layout_diffusion.regenerate_object", icon="FILE_REFRESH")
            layout.label(text="Select a labeled object to re-generate it", icon="INFO")
        else:
            op = row.operator(
                "layout_diffusion.regenerate_object",
                text=f"Re-generate {target.name}",
                icon="FILE_REFRESH",
            )
            op.object_name = target.name


class VIEW3D_PT_layout_diffusion_guidance(SidebarPanel, bpy.types.Panel):
    """The pull toward the proxy render, the init image, and animations starting each frame from
    the one before."""

    bl_label = places.GUIDANCE
    bl_parent_id = "VIEW3D_PT_layout_diffusion"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context) -> None:
        scene = context.scene
        settings = scene.layout_diffusion
        layout = self.layout
        layout.use_property_split = True
        layout.prop(settings, "use_reference")
        col = layout.column()
        col.active = settings.use_reference
        col.prop(settings, "reference_source")
        col.prop(settings, "reference_scale")
        row = col.row(align=True)
        row.prop(settings, "use_model_fraction", text="", icon="AUTO")
        steps = row.row(align=True)
        steps.active = not settings.use_model_fraction
        steps.prop(settings, "reference_fraction")
        if settings.use_model_fraction:
            chosen = engine_session.model_default("reference_fraction", model_spec(settings))
            if chosen is not None:
                col.label(text=f"The model pulls during {chosen:.0%} of the steps", icon="INFO")
        layout.separator()
        layout.prop(settings, "init_source")
        if settings.init_source == "IMAGE":
            _image_field(layout, settings, "init_image", "Image")
        elif settings.init_source == "LAYERS":
            layers = layer_count(scene)
            if layers:
                text = f"{layers} object layer{'s' if layers != 1 else ''} over the proxy render"
                layout.label(text=text, icon="RENDERLAYERS")
            else:
                layout.label(text="No labeled object has a Reference Image", icon="ERROR")
                layout.label(text="Set one in " + places.object_panel("Reference Image"))
        col = layout.column()
        col.active = settings.init_source != "NONE"
        col.prop(settings, "strength")
        layout.separator()
        layout.prop(settings, "use_init_previous")
        col = layout.column()
        col.active = settings.use_init_previous
        col.prop(settings, "init_previous_strength")


class VIEW3D_PT_layout_diffusion_conditions(SidebarPanel, bpy.types.Panel):
    """Depth ControlNet, IP-Adapter and GLIGEN: which models, how strong, and whether the
    engine has them (from the last health check)."""

    bl_label = places.CONDITIONS
    bl_parent_id = "VIEW3D_PT_layout_diffusion"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context) -> None:
        scene = context.scene
        settings = scene.layout_diffusion
        layout = self.layout
        layout.use_property_split = True

        layout.prop(settings, "controlnet")
        available, message = engine_session.condition_state(
            "controlnet", model_spec(settings, "controlnet")
        )
        _state_label(layout, available, message)
        col = layout.column(align=True)
        col.active = available is not False
        col.prop(settings, "depth_scale")
        col.prop(settings, "depth_start")
        col.prop(settings, "depth_end")

        layout.separator()
        layout.prop(settings, "ip_adapter")
        available, message = engine_session.condition_state(
            "ip_adapter", model_spec(settings, "ip_adapter")
        )
        _state_label(layout, available, message)
        with_images = [
            ob.name
            for ob in scene.objects
            if ob.layout_diffusion.enabled and ob.layout_diffusion.reference_image is not None
        ]
        if with_images:
            layout.label(text=f"Reference images on {len(with_images)} objects", icon="IMAGE_DATA")
            if available is False:
                layout.label(text="Clear them or fix the IP-Adapter to generate", icon="ERROR")

        layout.separator()
        layout.prop(settings, "gligen")
        spec = model_spec(settings, "gligen")
        available, message = engine_session.condition_state("gligen", spec)
        if spec:
            _state_label(layout, available, message)
        if not (settings.use_reference and settings.reference_source == "ENGINE"):
            layout.label(text="Used when the pull goes toward an Engine Pass", icon="INFO")

        task = preferences.check_task()
        row = layout.row()
        row.enabled = not (task is not None and task.running)
        row.operator("layout_diffusion.check_engine", icon="CHECKMARK")
        if task is not None and task.running:
            layout.label(text=task.status, icon="SORTTIME")
        elif task is not None and task.error:
            layout.label(text=task.error.splitlines()[0], icon="ERROR")


def _state_label(layout, available: bool | None, message: str) -> None:
    icon = {True: "CHECKMARK", False: "ERROR", None: "INFO"}[available]
    layout.label(text=message, icon=icon)


class VIEW3D_PT_layout_diffusion_output(SidebarPanel, bpy.types.Panel):
    """Where the result shows: the boxes in the camera view, the camera background, the image."""

    bl_label = places.OUTPUT
    bl_parent_id = "VIEW3D_PT_layout_diffusion"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context) -> None:
        settings = context.scene.layout_diffusion
        layout = self.layout
        layout.use_property_split = True
        layout.prop(settings, "show_overlay")
        layout.prop(settings, "use_as_camera_background")
        layout.operator("layout_diffusion.show_result", icon="IMAGE")


def draw_camera_header(self, context) -> None:
    """3D View header: a Generate button while looking through the camera."""
    space = context.space_data
    rv3d = getattr(space, "region_3d", None)
    if rv3d is None or rv3d.view_perspective != "CAMERA":
        return
    if operators.current_run() is None:
        self.layout.operator("layout_diffusion.generate", text="Generate", icon="RENDER_STILL")
    else:
        self.layout.operator("layout_diffusion.cancel", text="Cancel", icon="X")


def draw_object_context_menu(self, context) -> None:
    """3D View object context menu: Re-generate Object for a labeled active object."""
    obj = context.active_object
    if obj is None or not obj.layout_diffusion.enabled:
        return
    self.layout.separator()
    self.layout.operator("layout_diffusion.regenerate_object", icon="FILE_REFRESH")


CLASSES = (
    OBJECT_PT_layout_diffusion,
    VIEW3D_PT_layout_diffusion,
    # Sub-panels show in this order: the artist's order of thought.
    VIEW3D_PT_layout_diffusion_prompt,
    VIEW3D_PT_layout_diffusion_settings,
    VIEW3D_PT_layout_diffusion_objects,
    VIEW3D_PT_layout_diffusion_guidance,
    VIEW3D_PT_layout_diffusion_conditions,
    VIEW3D_PT_layout_diffusion_output,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.VIEW3D_HT_header.append(draw_camera_header)
    bpy.types.VIEW3D_MT_object_context_menu.append(draw_object_context_menu)


def unregister() -> None:
    bpy.types.VIEW3D_MT_object_context_menu.remove(draw_object_context_menu)
    bpy.types.VIEW3D_HT_header.remove(draw_camera_header)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
