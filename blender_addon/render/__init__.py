"""Generated images into Blender's render pipeline: the render engine (``engine``: F12,
Ctrl-F12, Combined and the layout passes), the resumable batch renderer (``batch``) with its
command line (``python -m blender_addon.render``), what every frame leaves (``publish``), the
watchdog that tells a hung engine from a slow one (``watchdog``), and frame claims for farms
that run Blender itself (``farm``)."""
