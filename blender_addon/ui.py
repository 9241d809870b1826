"""Panels: the object's label (Object properties), the Layout sidebar tab, the camera header."""

from __future__ import annotations

import bpy

from . import operators
from .blender.camera import render_resolution

MAX_LISTED = 40
"""Labeled objects listed in the sidebar; the rest are counted (the list is for checking)."""


class OBJECT_PT_layout_diffusion(bpy.types.Panel):
    """Object properties > Layout: whether the object is labeled, its prompt and weight."""

    bl_label = "Layout"
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
        layout = self.layout
        layout.use_property_split = True
        layout.active = settings.enabled
        layout.prop(settings, "prompt")
        layout.prop(settings, "weight")


class _SidebarPanel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Layout"


class VIEW3D_PT_layout_diffusion(_SidebarPanel, bpy.types.Panel):
    """Generate, its progress, and the scene's prompts."""

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
        width, height = render_resolution(scene)
        layout.label(text=f"{width} x {height} px (Output properties)", icon="IMAGE_DATA")
        layout.prop(settings, "prompt", text="")
        col = layout.column()
        col.use_property_split = True
        col.prop(settings, "negative_prompt", text="Negative")
        col.prop(settings, "background_prompt", text="Background")
        col.prop(settings, "model")
        row = layout.row(align=True)
        row.prop(settings, "show_overlay", toggle=True, icon="SELECT_SET")
        row.prop(settings, "use_as_camera_background", toggle=True, icon="IMAGE_BACKGROUND")
        row.operator("layout_diffusion.show_result", text="", icon="IMAGE")


class VIEW3D_PT_layout_diffusion_settings(_SidebarPanel, bpy.types.Panel):
    """Sampling settings."""

    bl_label = "Settings"
    bl_parent_id = "VIEW3D_PT_layout_diffusion"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context) -> None:
        settings = context.scene.layout_diffusion
        layout = self.layout
        layout.use_property_split = True
        layout.prop(settings, "seed")
        layout.prop(settings, "steps")
        layout.prop(settings, "guidance_scale")
        layout.prop(settings, "base_ratio")


class VIEW3D_PT_layout_diffusion_objects(_SidebarPanel, bpy.types.Panel):
    """The labeled objects, with their prompts and weights editable in place."""

    bl_label = "Labeled Objects"
    bl_parent_id = "VIEW3D_PT_layout_diffusion"

    def draw(self, context) -> None:
        layout = self.layout
        row = layout.row(align=True)
        row.operator("layout_diffusion.label_selected", icon="ADD")
        row.operator("layout_diffusion.unlabel_selected", icon="REMOVE")
        labeled = [ob for ob in context.scene.objects if ob.layout_diffusion.enabled]
        if not labeled:
            layout.label(text="Select proxy objects and press Label Selected", icon="INFO")
            return
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


CLASSES = (
    OBJECT_PT_layout_diffusion,
    VIEW3D_PT_layout_diffusion,
    VIEW3D_PT_layout_diffusion_settings,
    VIEW3D_PT_layout_diffusion_objects,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.VIEW3D_HT_header.append(draw_camera_header)


def unregister() -> None:
    bpy.types.VIEW3D_HT_header.remove(draw_camera_header)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
