"""The shapes world: a tiny synthetic domain and the small SDXL-architecture model trained on it.

Coloured circles, squares and triangles on neutral backgrounds are easy to draw, caption and
check by colour, so the whole layout-to-image path (Layout, regional guidance, placement
scoring) can be exercised and measured on a CPU with a model that ships inside the repository
(``engine/models/shapes``, the ``shapes`` model alias).

- ``world``: seeded scenes, captions and boxes;
- ``model``: the word-level tokenizer and the configs of the pipeline's parts;
- ``detect``: colour-segmentation scoring of an image against its layout
  (used by ``benchmarks/layout_fidelity.py``).

The model is trained by ``python -m training.train_shapes`` (outside the installed package).
"""
