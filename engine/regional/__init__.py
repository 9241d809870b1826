"""Regional prompting: where each region's prompt acts, in attention or latent mode.

``masks`` rasterizes regions, ``plan`` turns a Layout into prompt blocks and per-pixel weights,
``attention`` makes the UNet's cross-attention follow them (attention mode: each block over the
pixels it weighs, ``fused_merge`` merging them on a GPU) and ``latent`` blends one UNet call per
prompt by them (latent mode).
"""
