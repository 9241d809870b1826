"""What Generate leaves and how renders look: the result history (list, Load) and Use Standard
View, offered wherever colour management would change the engine's pixels."""

from __future__ import annotations

import os

import bpy

from ..blender.outputs import output_dir
from ..blender.view import use_standard_view, view_changes
from ..core import history, request
from . import operators
from .panels import SidebarPanel

ENGINE_ID = "LAYOUT_DIFFUSION"


class LAYOUT_DIFFUSION_OT_use_standard_view(bpy.types.Operator):
    """Set Color Management to the Standard view on an sRGB display, without look, exposure,
    gamma or curves, so renders show and save exactly the engine's pixels"""

    bl_idname = "layout_diffusion.use_standard_view"
    bl_label = "Use Standard View"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context) -> bool:
        return context.scene is not None

    def execute(self, context):
        use_standard_view(context.scene)
        self.report({"INFO"}, "Color Management: Standard view; renders keep the engine's pixels")
        return {"FINISHED"}


class LAYOUT_DIFFUSION_OT_load_result(bpy.types.Operator):
    """Make this earlier result the current one: shown as the result image, and the image
    Re-generate Object and Last Result start from"""

    bl_idname = "layout_diffusion.load_result"
    bl_label = "Load Result"
    bl_options = {"REGISTER", "UNDO"}

    number: bpy.props.IntProperty(name="Result", description="The history entry's number", min=1)

    @classmethod
    def poll(cls, context) -> bool:
        return context.scene is not None and operators.current_run() is None

    def execute(self, context):
        scene = context.scene
        folder = output_dir(scene)
        entry = history.find(folder, self.number)
        if entry is None:
            self.report({"ERROR"}, f"Result #{self.number} is no longer in the history")
            return {"CANCELLED"}
        result = os.path.join(folder, request.RESULT_NAME)
        history.restore(entry, result)
        operators.load_result(result, scene)
        if entry.seed is not None and 0 <= entry.seed <= request.MAX_SEED:
            scene.layout_diffusion.result_seed = entry.seed
        self.report({"INFO"}, f"Loaded result #{entry.number}, seed {entry.seed}")
        return {"FINISHED"}


def draw_history(layout, scene) -> None:
    """The scene's kept results, newest first, each with a Load button."""
    settings = scene.layout_diffusion
    layout.prop(settings, "history_size")
    folder = output_dir(scene, create=False)
    entries = history.entries(folder)
    if not entries:
        layout.label(text="No results yet", icon="INFO")
        return
    col = layout.column(align=True)
    for entry in entries:
        row = col.row(align=True)
        row.label(text=entry.label, icon="IMAGE_DATA")
        op = row.operator("layout_diffusion.load_result", text="", icon="IMPORT")
        op.number = entry.number


def draw_view_warning(layout, scene) -> None:
    """When renders would not show the engine's pixels: why, and the one button that fixes it."""
    if scene.render.engine != ENGINE_ID:
        return
    changes = view_changes(scene)
    if not changes:
        return
    box = layout.box()
    box.label(text="Renders differ from the generated image:", icon="ERROR")
    for change in changes:
        box.label(text=change)
    box.operator("layout_diffusion.use_standard_view", icon="COLOR")


def _draw_color_management(self, context) -> None:
    draw_view_warning(self.layout, context.scene)


class VIEW3D_PT_layout_diffusion_history(SidebarPanel, bpy.types.Panel):
    """The last results, each loadable again."""

    bl_label = "History"
    bl_parent_id = "VIEW3D_PT_layout_diffusion"
    """Set at registration: inside the Output panel where there is one."""
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context) -> None:
        draw_history(self.layout, context.scene)


class VIEW3D_PT_layout_diffusion_view(SidebarPanel, bpy.types.Panel):
    """Shown only while Color Management would change rendered frames: why, and the fix."""

    bl_label = "Render View"
    bl_parent_id = "VIEW3D_PT_layout_diffusion"

    @classmethod
    def poll(cls, context) -> bool:
        scene = context.scene
        return scene is not None and scene.render.engine == ENGINE_ID and bool(view_changes(scene))

    def draw(self, context) -> None:
        draw_view_warning(self.layout, context.scene)


CLASSES = (
    LAYOUT_DIFFUSION_OT_use_standard_view,
    LAYOUT_DIFFUSION_OT_load_result,
    VIEW3D_PT_layout_diffusion_history,
    VIEW3D_PT_layout_diffusion_view,
)


def register() -> None:
    if hasattr(bpy.types, "VIEW3D_PT_layout_diffusion_output"):
        VIEW3D_PT_layout_diffusion_history.bl_parent_id = "VIEW3D_PT_layout_diffusion_output"
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.RENDER_PT_color_management.append(_draw_color_management)


def unregister() -> None:
    bpy.types.RENDER_PT_color_management.remove(_draw_color_management)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
