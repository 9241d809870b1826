"""Blender glue: reads scenes through bpy and hands plain data to :mod:`..core`.

``camera``: the scene camera as a :class:`~..core.projection.CameraModel`; ``id_render``: the
Cycles render of object ids and depth; ``reference_render``: the flat-colour proxy render;
``scene_layout``: scene -> Layout (boxes, masks, depth); ``frame_request``: the one request
builder Generate, Re-generate Object, the batch and the render engine share; ``images``: Blender
images to PNG and image files read back; ``models``: model settings; ``outputs``: output folders.
"""
