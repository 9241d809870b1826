"""The engine client's own guards: requests that cannot be JSON, readable crash reports."""

from __future__ import annotations

import pytest

from blender_addon.client.engine_client import EngineClient, EngineError, clean_log_line


def test_a_request_that_is_not_json_fails_at_once_without_blaming_the_engine(tmp_path):
    client = EngineClient(str(tmp_path / "no-python"))
    with pytest.raises(EngineError) as error:
        client.generate({"prompt": "x", "guidance_scale": float("nan")}, str(tmp_path / "x.png"))
    assert error.value.code == "bad_request"
    assert "cannot be sent" in error.value.message and "finite" in error.value.message
    assert client.pid is None, "nothing was started"


def test_crash_reports_read_without_terminal_codes():
    bar = "generating:  50%|\x1b[32m#####\x1b[0m | 1/2\rgenerating: 100%|##########| 2/2\n"
    assert clean_log_line(bar) == "generating: 100%|##########| 2/2"
    assert clean_log_line("\x1b[31mRuntimeError\x1b[0m: boom\r\n") == "RuntimeError: boom"
    assert clean_log_line("plain line\n") == "plain line"
