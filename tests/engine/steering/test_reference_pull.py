"""Reference guidance: region scales, the pull toward the noised reference, and runs on the
tiny SDXL model through the step-end callback."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from PIL import Image

from engine.pipeline import RegionalSDXLPipeline
from engine.steering.hooks import prepare_step_hooks, start_latents
from engine.steering.latents import encode_image, initial_noise, set_schedule
from engine.steering.reference_pull import (
    ReferencePull,
    prepare_reference_pull,
    pull_map,
    pulled_levels,
    region_scale,
)
from engine.wire.edits import first_pass_layout
from engine.wire.layout import Layout, LayoutError, Region

SIDE = 64
LATENT = SIDE // 2  # the tiny VAE downsamples by 2


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = RegionalSDXLPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference_png(tmp_path_factory) -> str:
    """A flat-colour proxy render: red top-left quarter, green bottom-right, grey elsewhere."""
    pixels = np.full((SIDE, SIDE, 3), 128, dtype=np.uint8)
    pixels[: SIDE // 2, : SIDE // 2] = (230, 20, 20)
    pixels[SIDE // 2 :, SIDE // 2 :] = (20, 200, 40)
    path = tmp_path_factory.mktemp("reference") / "proxies.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def layout(**overrides) -> Layout:
    settings = dict(
        prompt="a red car and a tree",
        width=SIDE,
        height=SIDE,
        steps=6,
        seed=3,
        regions=[Region("a red car", (0.0, 0.0, 0.5, 0.5)), Region("a tree", (0.5, 0.5, 1, 1))],
    )
    settings.update(overrides)
    return Layout(**settings)


def bare(lay: Layout) -> Layout:
    """``lay`` without reference and init-image settings: the pipeline adds no hooks itself."""
    return first_pass_layout(lay, factor=1.0)


def run(pipe, lay: Layout, record=None):
    """Latents of ``lay`` with its step hooks passed explicitly (see also the wiring test)."""
    generator = torch.Generator("cpu").manual_seed(lay.seed)
    hooks = prepare_step_hooks(pipe, lay, generator)
    out = pipe(
        layout=bare(lay),
        generator=generator,
        latents=hooks.latents,
        callback_on_step_end=hooks.callback(record),
        output_type="latent",
    )
    return hooks, out.images


# -- Pure parts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "area, scale", [(0.5, 1.0), (0.25, 1.0), (0.0625, 2.0), (0.25 / 9, 3.0), (0.001, 4.0), (0, 0)]
)
def test_small_regions_get_a_larger_scale_up_to_the_cap(area, scale):
    assert region_scale(area) == pytest.approx(scale)


def test_pull_is_zero_outside_the_regions_and_capped_at_one():
    lay = layout(
        regions=[Region("big", (0.0, 0.0, 0.5, 0.5)), Region("small", (0.75, 0.75, 0.875, 0.875))]
    )
    pull = pull_map(lay, (8, 8), gamma=0.25)
    # big: area 1/4 -> scale 1 -> 2 * 0.25 * 1; small: area 1/64 -> scale 4 -> capped at 1.
    expected = torch.zeros(8, 8)
    expected[:4, :4] = 0.5
    expected[6, 6] = 1.0
    assert torch.equal(pull, expected)
    off = dataclasses.replace(lay, regions=[dataclasses.replace(lay.regions[0], weight=0.0)])
    assert not pull_map(off, (8, 8), gamma=0.25).any()


@pytest.mark.parametrize(
    "fraction, steps, levels", [(0.1, 30, 3), (0.4, 30, 12), (0.0, 30, 0), (0.01, 30, 1), (1, 4, 4)]
)
def test_guided_levels_round_to_whole_steps(fraction, steps, levels):
    assert pulled_levels(fraction, steps) == levels


class _Pipe:
    """What a step-end hook reads from the pipeline: its scheduler."""

    def __init__(self, scheduler):
        self.scheduler = scheduler


def _after_first_step(scheduler):
    """The scheduler as a step-end callback after step 0 sees it (step index 1)."""
    scheduler.set_timesteps(4)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    sample = torch.zeros(1, 4, 2, 2)
    scheduler.step(torch.zeros_like(sample), scheduler.timesteps[0], sample)
    return scheduler


def _hook(pull: torch.Tensor, levels: int = 3) -> ReferencePull:
    generator = torch.Generator().manual_seed(0)
    return ReferencePull(
        reference=torch.randn(1, 4, 2, 2, generator=generator),
        noise=torch.randn(1, 4, 2, 2, generator=generator),
        pull=pull,
        levels=levels,
    )


def test_step_end_pulls_toward_the_reference_noised_to_the_next_euler_sigma():
    scheduler = _after_first_step(EulerDiscreteScheduler(timestep_spacing="leading"))
    pull = torch.tensor([[1.0, 0.5], [0.0, 0.0]])[None, None]
    hook = _hook(pull)
    latents = torch.full((1, 4, 2, 2), 3.0)
    out = hook(_Pipe(scheduler), 0, scheduler.timesteps[0], {"latents": latents})["latents"]
    # After step 0 the latents sit at sigma 1 (the next timestep), where the reference is
    # x0 + sigma_1 * noise.
    target = hook.reference + scheduler.sigmas[1] * hook.noise
    torch.testing.assert_close(out[..., 0, 0], target[..., 0, 0])
    torch.testing.assert_close(out[..., 0, 1], (latents + target)[..., 0, 1] / 2)
    assert torch.equal(out[..., 1, :], latents[..., 1, :])  # no pull: untouched, bit for bit


def test_step_end_uses_the_next_ddim_alpha():
    scheduler = _after_first_step(DDIMScheduler())
    hook = _hook(torch.ones(1, 1, 2, 2))
    out = hook(_Pipe(scheduler), 0, scheduler.timesteps[0], {"latents": torch.zeros(1, 4, 2, 2)})
    abar = scheduler.alphas_cumprod[scheduler.timesteps[1]]
    expected = abar.sqrt() * hook.reference + (1 - abar).sqrt() * hook.noise
    torch.testing.assert_close(out["latents"], expected)


def test_no_pull_after_the_guided_fraction():
    scheduler = _after_first_step(EulerDiscreteScheduler())
    hook = _hook(torch.ones(1, 1, 2, 2), levels=1)  # level 0 only: before the first step
    assert hook(_Pipe(scheduler), 0, scheduler.timesteps[0], {"latents": torch.zeros(1)}) == {}


def test_two_call_schedulers_are_refused_by_name(pipe):
    heun = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="HeunDiscreteScheduler.*Euler"):
        set_schedule(_Pipe(heun), 4)


def test_first_pass_is_half_size_without_reference_or_init_image():
    lay = layout(
        width=1024,
        height=784,
        reference_scale=0.5,
        init_image="/tmp/x.png",
        strength=0.0,
        keep_outside=True,
        mode="latent",
        regions=[Region("a", (0, 0, 1, 1), strength=1.0)],
    )
    small = first_pass_layout(lay)
    assert small.mode == "attention"
    assert (small.width, small.height) == (512, 392)
    assert (small.reference_scale, small.init_image, small.keep_outside) == (0.0, None, False)
    assert small.regions[0].strength is None and small.regions[0].box == (0, 0, 1, 1)
    assert (first_pass_layout(layout()).width, first_pass_layout(layout()).height) == (64, 64)


# -- On the tiny model ----------------------------------------------------------------------------


def test_initial_noise_is_what_the_pipeline_draws(pipe):
    lay = layout()
    plain = pipe(layout=lay, output_type="latent").images
    generator = torch.Generator("cpu").manual_seed(lay.seed)
    given = pipe(
        layout=lay,
        generator=generator,
        latents=initial_noise(pipe, lay, torch.Generator("cpu").manual_seed(lay.seed)),
        output_type="latent",
    ).images
    assert torch.equal(plain, given)


def test_zero_pull_on_every_step_is_bit_identical_to_unguided(pipe, reference_png):
    lay = layout()
    plain = pipe(layout=lay, output_type="latent").images
    generator = torch.Generator("cpu").manual_seed(lay.seed)
    set_schedule(pipe, lay.steps)
    noise = initial_noise(pipe, lay, generator)
    guided = dataclasses.replace(lay, reference_scale=1.0, reference_fraction=1.0)
    hook = prepare_reference_pull(pipe, guided, Image.open(reference_png), noise)
    assert hook.levels == lay.steps
    hook.pull = torch.zeros_like(hook.pull)  # gamma 0, but every level still goes through the math
    calls = []

    def count(_pipe, step, _t, _tensors):
        calls.append(step)
        return {}

    out = pipe(
        layout=lay,
        generator=generator,
        latents=start_latents(noise, pipe.scheduler, [hook]),
        callback_on_step_end=lambda *a: {**hook(*a), **count(*a)},
        output_type="latent",
    ).images
    assert calls == list(range(lay.steps))
    assert torch.equal(out, plain)


def test_scale_zero_makes_no_hooks_and_draws_nothing(pipe, reference_png):
    lay = layout(reference=reference_png, reference_scale=0.0)
    generator = torch.Generator("cpu").manual_seed(5)
    state = generator.get_state()
    hooks = prepare_step_hooks(pipe, lay, generator)
    assert not hooks.hooks and hooks.composite is None
    assert hooks.latents is None and hooks.callback() is None
    assert torch.equal(generator.get_state(), state)


def test_guided_latents_are_closer_to_the_reference_inside_the_boxes(pipe, reference_png):
    lay = layout(reference=reference_png, reference_fraction=0.5)  # 3 of 6 steps
    seen: dict[int, dict[int, torch.Tensor]] = {}

    def recorder(store):
        def record(_pipe, step, _t, tensors):
            store[step + 1] = tensors["latents"].clone()
            return {}

        return record

    distances = {}
    for scale in (0.0, 0.25):
        seen[scale] = {}
        hooks, final = run(
            pipe, dataclasses.replace(lay, reference_scale=scale), recorder(seen[scale])
        )
        seen[scale]["final"] = final
    hooks, _ = run(pipe, dataclasses.replace(lay, reference_scale=0.25))
    (guidance,) = hooks.hooks
    assert guidance.levels == 3
    inside = (guidance.pull > 0).expand(1, 4, LATENT, LATENT)
    assert inside.sum() == 2 * 4 * (LATENT // 2) ** 2  # both boxes, nothing else

    # At the last guided level, against the reference noised to that level (Euler: + sigma*noise).
    sigma = pipe.scheduler.sigmas[2]
    target = guidance.reference + sigma * guidance.noise
    for scale in (0.0, 0.25):
        diff = seen[scale][2] - target
        distances[scale] = (diff[inside].square().mean().item(), diff[~inside].square().mean())
    assert distances[0.25][0] < 0.6 * distances[0.0][0]
    # The clean result, too, ends up nearer the reference's latents inside the boxes.
    final = {s: (seen[s]["final"] - guidance.reference)[inside].square().mean() for s in seen}
    assert final[0.25] < 0.9 * final[0.0]


def test_guided_run_is_deterministic_and_changes_the_image(pipe, reference_png):
    lay = layout(reference=reference_png, reference_scale=0.25, steps=3)
    _, first = run(pipe, lay)
    _, second = run(pipe, lay)
    plain = pipe(layout=layout(steps=3), output_type="latent").images
    assert torch.equal(first, second)
    assert not torch.equal(first, plain)


def test_without_a_reference_file_a_first_pass_is_the_reference(pipe):
    lay = layout(width=128, height=128, steps=2, reference_scale=0.25)
    hooks = prepare_step_hooks(pipe, lay, torch.Generator("cpu").manual_seed(lay.seed))
    (guidance,) = hooks.hooks
    small = pipe(layout=first_pass_layout(lay), output_type="pil").images[0]
    assert small.size == (64, 64)
    expected = encode_image(pipe, small.resize((128, 128), Image.Resampling.BICUBIC), 128, 128)
    torch.testing.assert_close(guidance.reference, expected)


def test_a_missing_reference_names_the_field(pipe, tmp_path):
    lay = layout(reference=str(tmp_path / "gone.png"), reference_scale=0.25)
    with pytest.raises(LayoutError, match="does not exist") as info:
        prepare_step_hooks(pipe, lay, torch.Generator("cpu").manual_seed(0))
    assert info.value.field == "reference"


def test_the_pipeline_applies_the_layouts_reference_guidance_itself(pipe, reference_png):
    lay = layout(reference=reference_png, reference_scale=0.25, reference_fraction=0.5)
    _, explicit = run(pipe, lay)
    wired = pipe(layout=lay, output_type="latent").images
    assert torch.equal(wired, explicit)


def test_progress_counts_once_across_the_first_pass(pipe, tmp_path, reference_png):
    from engine.service.generate import planned_steps, run_generation

    steps: list[tuple[int, int]] = []
    two_pass = layout(reference_scale=0.25, steps=3)
    assert planned_steps(pipe, two_pass) == 6
    run_generation(
        pipe, two_pass, str(tmp_path / "a.png"), "tiny", on_step=lambda *s: steps.append(s)
    )
    assert steps == [(k, 6) for k in range(1, 7)]

    steps.clear()
    with_file = dataclasses.replace(two_pass, reference=reference_png)
    assert planned_steps(pipe, with_file) == 3
    run_generation(
        pipe, with_file, str(tmp_path / "b.png"), "tiny", on_step=lambda *s: steps.append(s)
    )
    assert steps == [(1, 3), (2, 3), (3, 3)]
