"""The shared plumbing of the step-end hooks: chaining callbacks and the starting latents."""

from __future__ import annotations

import torch

from engine.steering.hooks import StepHooks, chain_step_hooks, start_latents
from engine.steering.latents import blend


def test_chained_hooks_see_each_others_latents_and_skip_none():
    seen = []

    def double(_pipe, _step, _t, tensors):
        return {"latents": tensors["latents"] * 2}

    def record(_pipe, step, _t, tensors):
        seen.append((step, tensors["latents"].item()))
        return {}

    chained = chain_step_hooks(None, double, record, double)
    assert chained(None, 4, 0, {"latents": torch.tensor(3.0)}) == {"latents": torch.tensor(12.0)}
    assert seen == [(4, 6.0)]
    assert chain_step_hooks(None, record) is record
    assert chain_step_hooks(None, None) is None
    assert StepHooks().callback(record) is record


class _Scheduler:
    init_noise_sigma = 3.0


class _Edit:
    """Adds 1 to the first element at level 0."""

    def start(self, latents, scheduler):
        edited = latents.clone()
        edited[0] += 1.0
        return edited


class _Keep:
    def start(self, latents, scheduler):
        return latents


def test_start_latents_keep_untouched_noise_exact():
    noise = torch.tensor([0.1, 0.7, -1.3])
    assert start_latents(noise, _Scheduler(), [_Keep()]) is noise
    edited = start_latents(noise, _Scheduler(), [_Keep(), _Edit()])
    # Edited at the pipeline's scale (noise * 3), divided back; the rest is the noise itself.
    torch.testing.assert_close(edited[0], (noise[0] * 3 + 1) / 3)
    assert torch.equal(edited[1:], noise[1:])


def test_blend_is_exact_at_both_ends():
    kept, free = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([7.7, 8.8, 9.9])
    weight = torch.tensor([0.0, 1.0, 0.5])
    out = blend(kept, free, weight)
    assert out[0] == kept[0] and out[1] == free[1]
    torch.testing.assert_close(out[2], (kept[2] + free[2]) / 2)
