"""The fused merge kernel (Triton) against the PyTorch merge, in Triton's CPU interpreter.

Runs in a child process, where the interpreter can be chosen before Triton is imported.
Skipped where Triton is not installed; ``benchmarks/gpu_check.py`` checks it on a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

BLENDS = ("joint", "weighted")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

SCRIPT = """
import torch
from engine.regional.attention import merge_blocks
from engine.regional.fused_merge import merge_by_query
from engine.regional.plan import RegionalState, plan_regions
from engine.wire.layout import Layout, Region

regions = [
    Region(f"object {i % 5}", (0.1 * i, 0.07 * i, 0.1 * i + 0.4, 0.07 * i + 0.5), weight=0.5 + i / 9)
    for i in range(9)
]
plan = plan_regions(Layout(prompt="a shelf", base_ratio=0.3, regions=regions), (16, 12))
for rows, negative in ((1, 0), (2, 0), (2, 1), (4, 2)):
    # With negative rows: one whole-row segment each, as the guided batch has them.
    pairs = RegionalState(plan, 4, True).block_pairs(8 * 6, "cpu", rows, negative)
    generator = torch.Generator().manual_seed(rows)
    heads, dim = 3, 20  # neither a power of two
    out = torch.randn(pairs.pairs, heads, dim, generator=generator)
    # As the variable-length kernel returns it: (heads, pairs), read transposed.
    lse = (4 * torch.randn(heads, pairs.pairs, generator=generator)).T
    order, offsets = pairs.by_query()
    for blend in ("joint", "weighted"):
        weight = pairs.log_weight if blend == "joint" else pairs.share
        got = merge_by_query(out, lse, weight, offsets, order, blend == "joint")
        expected = merge_blocks(out.clone(), lse, pairs, rows * 48, blend)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        print(rows, negative, blend, "ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_fused_merge_equals_the_pytorch_merge():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [f"{r} {n} {b} ok" for r, n in ((1, 0), (2, 0), (2, 1), (4, 2)) for b in BLENDS]
    assert result.stdout.split("\n")[:8] == lines
