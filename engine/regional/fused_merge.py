"""The merge of sparse regional attention as one GPU kernel (Triton).

Sparse attention gives each (query, prompt block) pair its block's attention output and
log-sum-exp. A query's result is its pairs' outputs weighted by ``softmax(lse + log(weight))``
(joint blend) or by the normalised weights (weighted blend). With PyTorch operations that is a
dozen kernels per layer and atomic adds in half precision; here one program per query walks
its pairs (grouped by query: ``order``, ``offsets``) with an online softmax in float32 and
writes the result once: no atomics, deterministic, one launch. Imported only where Triton and
a GPU are there (``engine.regional.attention`` falls back to PyTorch operations otherwise).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    out_ptr,
    lse_ptr,
    weight_ptr,
    offsets_ptr,
    order_ptr,
    result_ptr,
    heads,
    dim,
    stride_out_pair,
    stride_out_head,
    stride_lse_pair,
    stride_lse_head,
    stride_result_query,
    stride_result_head,
    JOINT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    query = tl.program_id(0)
    start = tl.load(offsets_ptr + query)
    end = tl.load(offsets_ptr + query + 1)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_in = h < heads
    tile_in = h_in[:, None] & (d < dim)[None, :]
    peak = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for i in range(start, end):
        pair = tl.load(order_ptr + i).to(tl.int64)
        weight = tl.load(weight_ptr + pair)
        values = tl.load(
            out_ptr + pair * stride_out_pair + h[:, None] * stride_out_head + d[None, :],
            mask=tile_in,
            other=0.0,
        ).to(tl.float32)
        if JOINT:
            logit = weight + tl.load(
                lse_ptr + pair * stride_lse_pair + h * stride_lse_head, mask=h_in, other=0.0
            )
            new_peak = tl.maximum(peak, logit)
            rescale = tl.exp(peak - new_peak)
            share = tl.exp(logit - new_peak)
            total = total * rescale + share
            acc = acc * rescale[:, None] + share[:, None] * values
            peak = new_peak
        else:
            acc += weight * values
    if JOINT:
        acc = acc / total[:, None]
    target = result_ptr + query * stride_result_query + h[:, None] * stride_result_head + d[None, :]
    tl.store(target, acc.to(result_ptr.dtype.element_ty), mask=tile_in)


def merge_by_query(
    out: torch.Tensor,
    lse: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    order: torch.Tensor,
    joint: bool,
) -> torch.Tensor:
    """Each query's blend of its pairs' ``out`` ``(pairs, heads, dim)``; ``(queries, heads, dim)``.

    ``lse`` ``(pairs, heads)`` float32 (any strides), ``weight`` ``(pairs,)`` float32: the
    log-weights (``joint``) or the normalised weights; ``order`` the pairs grouped by query,
    ``offsets`` ``(queries + 1,)`` where each query's group starts. Every query has a pair.
    """
    heads, dim = out.shape[1:]
    if out.stride(2) != 1:
        out = out.contiguous()
    queries = len(offsets) - 1
    result = out.new_empty((queries, heads, dim))
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(dim)
    _merge_kernel[(queries,)](
        out,
        lse,
        weight,
        offsets,
        order,
        result,
        heads,
        dim,
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        lse.stride(1),
        result.stride(0),
        result.stride(1),
        JOINT=joint,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4 if block_h * block_d >= 2048 else 2,
    )
    return result
