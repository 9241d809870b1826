"""Regional prompting: where each region's prompt acts, in attention or latent mode.

``masks`` rasterizes regions, ``plan`` turns a Layout into prompt blocks and per-pixel weights,
``attention`` biases the UNet's cross-attention by them (attention mode) and ``latent`` blends
one UNet call per prompt by them (latent mode).
"""
