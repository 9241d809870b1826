"""Layout limits, invalid Unicode, deep JSON and where a Layout file's images may live."""

from __future__ import annotations

import json
import os

import pytest

from engine.wire.layout import (
    LIMITS,
    MAX_JSON_DEPTH,
    MAX_PROMPT_CHARS,
    MAX_REGIONS,
    Layout,
    LayoutError,
    LimitError,
    json_depth,
)


def region(**overrides) -> dict:
    return {"prompt": "a red car", "box": [0.1, 0.5, 0.4, 0.9], **overrides}


def test_limits_are_named_and_errors_carry_limit_and_value():
    assert LIMITS["regions"] == MAX_REGIONS and LIMITS["prompt_chars"] == MAX_PROMPT_CHARS
    with pytest.raises(LimitError) as info:
        Layout.from_dict({"prompt": "x", "regions": [region()] * (MAX_REGIONS + 1)})
    assert (info.value.limit, info.value.maximum, info.value.field) == (
        "regions",
        MAX_REGIONS,
        "regions",
    )
    assert f"{MAX_REGIONS + 1} regions; the limit is {MAX_REGIONS}" in str(info.value)
    Layout.from_dict({"prompt": "x", "regions": [region()] * MAX_REGIONS})

    with pytest.raises(LimitError) as info:
        Layout.from_dict({"prompt": "x", "regions": [region(prompt="y" * (MAX_PROMPT_CHARS + 1))]})
    assert (info.value.limit, info.value.field) == ("prompt_chars", "regions[0].prompt")
    with pytest.raises(LimitError, match="name_chars|characters long") as info:
        Layout.from_dict({"prompt": "x", "regions": [region(name="n" * 5000)]})
    assert info.value.limit == "name_chars"
    with pytest.raises(LimitError) as info:
        Layout.from_dict({"prompt": "x", "depth": "/" + "d" * 5000})
    assert info.value.limit == "path_chars"


@pytest.mark.parametrize(
    "data, field",
    [
        ({"prompt": "a\ud800"}, "prompt"),
        ({"prompt": "x", "negative_prompt": "\udfff"}, "negative_prompt"),
        ({"prompt": "x", "background_prompt": "\ud800b"}, "background_prompt"),
        ({"prompt": "x", "regions": [region(prompt="car\ud801")]}, "regions[0].prompt"),
        ({"prompt": "x", "regions": [region(mask="/tmp/\ud800.png")]}, "regions[0].mask"),
        ({"prompt": "x", "regions": [region(**{"z\ud800": 1})]}, "regions[0].z?"),
    ],
)
def test_unpaired_surrogates_are_refused_with_the_field(data, field):
    with pytest.raises(LayoutError) as info:
        Layout.from_dict(data)
    assert info.value.field == field
    str(info.value).encode("utf-8", "backslashreplace")


def test_nul_in_a_path_is_refused():
    with pytest.raises(LayoutError, match="NUL") as info:
        Layout.from_dict({"prompt": "x", "init_image": "/tmp/a\x00b.png"})
    assert info.value.field == "init_image"


def test_deep_json_is_a_limit_not_a_crash():
    deep = '{"prompt": "x", "regions": ' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(LimitError) as info:
        Layout.from_json(deep)
    assert (info.value.limit, info.value.maximum) == ("json_depth", MAX_JSON_DEPTH)
    # Deep enough to pass the parser but past the limit: the same error.
    middle = '{"prompt": "x", "regions": ' + "[" * 200 + "]" * 200 + "}"
    with pytest.raises(LimitError, match="more than 32 deep"):
        Layout.from_json(middle)
    assert json_depth([[[]], {"a": [1]}], 10) == 3


def test_error_messages_stay_short_for_huge_values():
    with pytest.raises(LayoutError) as info:
        Layout.from_dict({"prompt": "x", "steps": list(range(100_000))})
    assert len(str(info.value)) < 200


def test_layout_file_inputs_stay_inside_its_folder(tmp_path):
    folder = tmp_path / "shot"
    (folder / "masks").mkdir(parents=True)
    (folder / "masks" / "car.png").write_bytes(b"")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"")
    (folder / "masks" / "link.png").symlink_to(outside)

    def save(name: str, mask: str) -> str:
        path = folder / name
        path.write_text(json.dumps({"prompt": "x", "regions": [region(mask=mask)]}))
        return str(path)

    inside = Layout.load(save("ok.json", "masks/car.png"))
    assert inside.regions[0].mask == str(folder / "masks" / "car.png")
    for name, mask in [
        ("up.json", "../../../../etc/passwd"),
        ("abs.json", str(outside)),
        ("link.json", "masks/link.png"),
    ]:
        with pytest.raises(LayoutError, match="outside the Layout file's folder") as info:
            Layout.load(save(name, mask))
        assert info.value.field == "regions[0].mask"
        assert "--allow-outside-inputs" in str(info.value)
    allowed = Layout.load(save("up2.json", "../secret.png"), allow_outside=True)
    assert allowed.regions[0].mask == str(outside)
    # Inline Layouts (serve) have no folder: absolute paths anywhere, as before.
    assert Layout.from_dict({"prompt": "x", "depth": str(outside)}).depth == str(outside)


def test_layout_file_that_is_not_utf8_or_too_long(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'{"prompt": "\xff"}')
    with pytest.raises(LayoutError, match="not UTF-8"):
        Layout.load(path)
    assert os.path.getsize(path) < 100
