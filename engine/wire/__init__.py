"""What travels between the add-on and the engine: the Layout schema, the serve protocol's
vocabulary, atomic file writes and the Layout edits both sides make.

Standard library only: the add-on ships this package as it is (``blender_addon/wire`` links
here), so nothing in it may import torch, bpy or any other part of the engine.
"""
