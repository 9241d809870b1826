"""Optional conditions on a Layout call, each acting only when its model is attached.

``depth`` (depth ControlNet from the Layout's depth map), ``object_images`` (IP-Adapter
image per object, inside its mask), ``gligen`` (GLIGEN making the layout reference) and
``apply`` (what a ``pipe(layout=...)`` call runs inside).
"""
