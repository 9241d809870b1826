"""What the panels and Generate say a generation costs, from the engine's ``cost``."""

from __future__ import annotations

from blender_addon.client import cost

SHAPES = {
    "available": True,
    "native_size": 64,
    "latent_factor": 4,
    "unet_flops": [6.4e7, 2.34e6, 880.0],
    "vae_flops": [0.0, 2.0e6, 256.0],
    "seconds_per_flop": 3e-11,
    "source": "device_speed",
}


def test_without_a_cost_it_says_how_to_get_one():
    assert cost.describe(None, 1920, 1080, 30, True, 0.4) == [
        ("Estimate: press Estimate Cost or Check engine", "TIME")
    ]


def test_near_native_one_line_of_time():
    lines = cost.describe({**SHAPES, "source": "measured"}, 64, 64, 30, True, 0.4)
    assert lines == [
        ("Native 64 x 64, generating 64 x 64", "IMAGE_DATA"),
        ("About 1 s at 64 x 64", "TIME"),
    ]


def test_far_above_native_with_and_without_the_fix():
    on = cost.describe(SHAPES, 1920, 1080, 30, True, 0.4)
    assert on[0] == ("Native 64 x 64, generating 1920 x 1080", "IMAGE_DATA")
    text, icon = on[1]
    # Hours either way on the CPU with a 64 px model: a warning, a lower bound before any run.
    assert text.startswith("At least ")
    assert text.endswith(" h with High-res Fix: lower the resolution for a quicker image")
    assert icon == "ERROR"
    assert on[2][0].startswith("128 x 72, then 1920 x 1080 at strength 0.40 (directly: ")
    off = cost.describe(SHAPES, 1920, 1080, 30, False, 0.4)
    assert off[1][1] == "ERROR" and "506x the native area" in off[1][0]


def test_answer_keeps_the_cost_and_survives_a_slow_engine():
    class Reply:
        def __init__(self, event):
            self.event = event

        def wait(self, timeout):
            if self.event is None:
                raise TimeoutError
            return self.event

    cost.forget()
    assert cost.answer(Reply(None), "shapes", 0.1) is None
    hello = {"event": "hello", "cost": SHAPES}
    assert cost.answer(Reply(hello), "shapes", 0.1) == SHAPES
    assert cost.native_size("shapes") == 64
    # An engine that cannot tell keeps what was known.
    assert cost.answer(Reply({"event": "error", "code": "internal"}), "shapes", 0.1) == SHAPES
    cost.remember("other", {"available": False, "message": "no configs"})
    assert cost.known("other") is None and cost.native_size("other") is None
    cost.forget()


def test_a_quick_high_res_fix_gives_no_advice():
    text, icon = cost.describe(SHAPES, 160, 96, 4, True, 0.5)[1]
    assert icon == "TIME" and text.endswith(" with High-res Fix")
