"""Layout Diffusion engine: a Layout in, a regionally guided SDXL image out.

Importing this package is cheap and torch-free; the pipeline modules load torch when used.
"""

__version__ = "0.1.0"
