"""Blender glue: reads scenes through bpy and hands plain data to ``blender_addon.io``."""
