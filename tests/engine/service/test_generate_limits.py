"""One generation's limits on the tiny model: cancel inside a step, the time budget, token
counts, and the operation counts the estimate rests on."""

from __future__ import annotations

import json

import pytest

from engine.errors import CancelledError, LimitExceededError
from engine.pipeline import RegionalSDXLPipeline
from engine.service import limits
from engine.service.generate import run_generation
from engine.wire.layout import Layout, LimitError, Region


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = RegionalSDXLPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def layout(**overrides) -> Layout:
    fields = dict(prompt="a red circle", width=64, height=64, steps=3, seed=3)
    fields.update(overrides)
    return Layout(**fields)


def test_cancel_lands_within_one_block_not_at_the_end_of_the_step(pipe, tmp_path):
    ran: list[str] = []
    stop = {"now": False}

    def record(name):
        def hook(module, args):
            ran.append(name)
            if name == "down_blocks.1":
                stop["now"] = True  # a cancel arriving while the UNet is half-way down

        return hook

    handles = [
        pipe.unet.down_blocks[1].register_forward_pre_hook(record("down_blocks.1")),
        pipe.unet.up_blocks[0].register_forward_pre_hook(record("up_blocks.0")),
    ]
    steps: list[int] = []
    out = tmp_path / "x.png"
    try:
        with pytest.raises(CancelledError, match="during step 1"):
            run_generation(
                pipe,
                layout(),
                str(out),
                "tiny",
                on_step=lambda step, total: steps.append(step),
                should_stop=lambda: stop["now"],
            )
    finally:
        for handle in handles:
            handle.remove()
    assert ran == ["down_blocks.1"], "the UNet must stop before its next block"
    assert steps == [] and not out.exists()
    # The hooks are gone: the next generation runs whole.
    result = run_generation(pipe, layout(), str(out), "tiny")
    assert out.is_file() and result.width == 64


def test_token_window_is_checked_with_the_models_tokenizers(pipe):
    fits = layout(prompt="b" * 75, regions=[Region("c" * 75, (0, 0, 1, 1))])
    limits.check_prompt_tokens(pipe, fits)
    for field, changed in [
        ("prompt", layout(prompt="b" * 76)),
        ("negative_prompt", layout(negative_prompt="n" * 80)),
        ("background_prompt", layout(background_prompt="g" * 90)),
        ("regions[0].prompt", layout(regions=[Region("c" * 76, (0, 0, 1, 1))])),
    ]:
        with pytest.raises(LimitError) as info:
            limits.check_prompt_tokens(pipe, changed)
        assert (info.value.field, info.value.limit, info.value.maximum) == (
            field,
            "prompt_tokens",
            77,
        )


def test_operation_counts_fit_exactly_and_sdxl_is_known(pipe):
    key = limits.config_key(pipe.unet.config)
    c, a, b = limits.fitted_flops("unet", key)
    ((side, counted),) = limits._count_flops("unet", json.loads(key), (48,))
    assert c + a * side**2 + b * side**4 == pytest.approx(counted, rel=1e-6)
    assert b > 0, "self-attention grows with the square of the pixels"
    assert len(limits.KNOWN_FLOPS) == 2


def test_time_budget_refuses_early_and_stops_once_measured_steps_say_so(pipe, monkeypatch):
    big = layout(width=4096, height=4096, steps=50)
    with pytest.raises(LimitExceededError, match="would take at least") as info:
        limits.TimeBudget(pipe, big, 50, max_seconds=30.0).check_before()
    assert (info.value.limit, info.value.maximum) == ("generate_seconds", 30.0)
    assert limits.TimeBudget(pipe, big, 50, max_seconds=0).check_before() > 30.0

    clock = {"now": 100.0}
    monkeypatch.setattr(limits.time, "perf_counter", lambda: clock["now"])
    budget = limits.TimeBudget(pipe, layout(steps=20), 20, max_seconds=60.0)
    budget.check_before()
    clock["now"] += 5.0  # a slow first step (warm-up) does not decide alone
    assert budget.after_step(1) == pytest.approx(19 * 5.0, rel=0.1)
    clock["now"] += 4.0
    with pytest.raises(LimitExceededError, match="would take 1.4 min"):
        budget.after_step(2)


def test_the_pipeline_itself_refuses_what_it_would_cut(pipe):
    with pytest.raises(LimitError, match="would be silently cut") as info:
        pipe(layout=layout(regions=[Region("d" * 90, (0, 0, 1, 1))]), output_type="latent")
    assert (info.value.field, info.value.limit) == ("regions[0].prompt", "prompt_tokens")
