"""benchmarks/gpu_check.py runs end to end on the CPU with a tiny UNet (--tiny)."""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, BENCHMARKS)
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(BENCHMARKS)


def test_tiny_run_prints_one_table_and_sparse_matches_dense(gpu_check, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = gpu_check.main(["--tiny", "--sizes", "64", "--repeat", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "segment kernel error" in printed and "vs dense" in printed
    assert not [r for r in rows if "error" in r]
    cases = [(r["case"], r["attention"]) for r in rows]
    assert cases == [
        ("plain", "plain"),
        ("1 distinct", "dense"),
        ("1 distinct", "sparse"),
        ("8 distinct", "dense"),
        ("8 distinct", "sparse"),
        ("100 distinct", "dense"),
        ("100 distinct", "sparse"),
        ("100 distinct", "sparse-0"),
        ("100 shared", "dense"),
        ("100 shared", "sparse"),
    ]
    assert [r["blocks"] for r in rows] == [1, 3, 3, 10, 10, 102, 102, 102, 3, 3]
    for row in rows:
        assert row["step_ms"] > 0 and row["first_ms"] > 0
        if row["attention"].startswith("sparse"):
            assert row["vs_dense"] < 1e-4
    kept = {r["attention"]: r["kept_mib"] for r in rows if r["case"] == "100 distinct"}
    assert kept["sparse"] > 0 and kept["sparse-0"] == 0 and kept["dense"] == 0
    assert json.loads(out.read_text()) == rows


def test_kernel_check_is_small_on_cpu(gpu_check):
    import torch

    assert gpu_check.kernel_check(torch.device("cpu"), torch.float32) < 1e-4


def test_refuses_to_run_without_cuda_unless_tiny(gpu_check, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.main([])
