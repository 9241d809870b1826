"""Pure data conversions for the add-on (numpy and the standard library only, never bpy).

``projection``: camera model, projection and boxes; ``masks``: id and depth images to masks and
depth maps; ``png``: grayscale PNG files. Kept free of Blender so they are tested directly.
"""
