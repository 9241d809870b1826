"""Pure data conversions for the add-on (numpy and the standard library only, never bpy).

``projection``: camera model, projection and boxes; ``masks``: id and depth images to masks and
depth maps; ``colors``: flat colours for the reference render; ``composite``: object layers
over the proxy render (an init image); ``png``: grayscale and RGB PNG files. Kept free of Blender so they are tested directly.
"""
