"""Latent edits between denoising steps, as diffusers' step-end callbacks.

``latents`` holds the helpers they share, ``reference_pull`` pulls the first steps toward the
layout reference, ``object_strength`` keeps parts of an init image per object, and ``hooks``
chains them for one call.
"""
