"""PromptCache: per-text encoded prompts, bounded by bytes, dropped when the encoders change."""

from __future__ import annotations

import torch

from engine.prompt_cache import PromptCache, encoder_identity


class _Encoder:
    """Encodes a text as its length repeated; records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.asked.append(list(texts))
        lengths = torch.tensor([float(len(t)) for t in texts])
        return lengths[:, None, None].expand(-1, 3, 4).clone(), lengths[:, None].expand(-1, 4)


def test_only_missing_texts_are_encoded_each_once():
    cache, encoder = PromptCache(), _Encoder()
    encoded, pooled = cache.encode(["ab", "c", "ab"], "v", "owner", encoder)
    assert encoder.asked == [["ab", "c"]]
    assert encoded.shape == (3, 3, 4) and pooled.shape == (3, 4)
    assert encoded[:, 0, 0].tolist() == [2.0, 1.0, 2.0]
    again, _ = cache.encode(["c", "dddd"], "v", "owner", encoder)
    assert encoder.asked[-1] == ["dddd"]
    assert again[:, 0, 0].tolist() == [1.0, 4.0]
    cache.encode(["c"], "other settings", "owner", encoder)
    assert encoder.asked[-1] == ["c"]
    assert cache.hits == 2 and cache.misses == 4


def test_bounded_by_bytes_least_recently_used_first():
    entry = (3 * 4 + 4) * 4  # float32 embedding and pooled vector
    cache, encoder = PromptCache(max_bytes=2 * entry), _Encoder()
    cache.encode(["a"], "v", None, encoder)
    cache.encode(["bb"], "v", None, encoder)
    cache.encode(["a"], "v", None, encoder)  # "a" is now the most recent
    cache.encode(["ccc"], "v", None, encoder)  # drops "bb"
    assert len(cache) == 2 and cache.bytes == 2 * entry
    cache.encode(["a"], "v", None, encoder)
    assert encoder.asked[-1] == ["ccc"]
    cache.encode(["bb"], "v", None, encoder)
    assert encoder.asked[-1] == ["bb"]


def test_another_owner_starts_afresh():
    cache, encoder = PromptCache(), _Encoder()
    cache.encode(["a"], "v", "first model", encoder)
    cache.encode(["a"], "v", "second model", encoder)
    assert encoder.asked == [["a"], ["a"]] and len(cache) == 1


def test_encoder_identity_sees_in_place_weight_changes():
    module = torch.nn.Linear(2, 2)
    before = encoder_identity(module, None)
    assert encoder_identity(module, None) == before
    with torch.no_grad():
        module.weight.add_(1.0)
    assert encoder_identity(module, None) != before
    assert encoder_identity(module.half(), None) != encoder_identity(torch.nn.Linear(2, 2), None)


def test_identical_serve_requests_encode_once_and_a_new_model_starts_empty(
    tiny_model_dir, tmp_path
):
    """Through the service's pipeline cache and generation, as ``engine serve`` runs them."""
    from engine.loading.assemble import PipelineCache
    from engine.loading.locate import LoadOptions
    from engine.service.generate import run_generation
    from engine.wire.layout import Layout, Region

    layout = Layout(
        prompt="a kettle and a cup",
        width=64,
        height=64,
        steps=2,
        regions=[Region("a kettle", (0, 0, 0.5, 1)), Region("a cup", (0.5, 0.3, 0.9, 0.8))],
    )
    cache = PipelineCache()
    options = LoadOptions(device="cpu")
    pipe, _ = cache.get(tiny_model_dir, options)
    encoded = []
    hook = pipe.text_encoder.register_forward_hook(lambda *_: encoded.append(1))
    try:
        run_generation(pipe, layout, str(tmp_path / "a.png"), "tiny")
        first = len(encoded)
        again, _ = cache.get(tiny_model_dir, options)
        assert again is pipe
        run_generation(again, layout, str(tmp_path / "b.png"), "tiny")
    finally:
        hook.remove()
    assert first > 0 and len(encoded) == first, "the second request encoded nothing"
    assert len(pipe.prompt_cache) > 0
    cache.release()  # another model: the next pipeline, and its prompt cache, start afresh
    fresh, _ = cache.get(tiny_model_dir, options)
    assert fresh is not pipe and len(fresh.prompt_cache) == 0
