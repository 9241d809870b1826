"""Pure add-on code (numpy and the standard library only, never bpy), tested without Blender.

``projection``: camera model, projection and boxes; ``masks``: id and depth images to masks and
depth maps; ``colors``: flat colours for the proxy render; ``composite``: object layers over the
proxy render (an init image); ``png``: PNG files; ``frames``: resumable animation frame files;
``request``: scene settings to Layout fields and engine options, and the engine's errors in the
artist's words; ``errors``: :class:`~.errors.UserError`; ``names``: safe file names.
"""
