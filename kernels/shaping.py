"""DAPO's shaping in Triton, mirroring ``rlloss.shaping``.

Launches: ``soft_overlong_penalty`` one elementwise kernel; ``dynamic_sampling_mask`` one segment
kernel (min and max per group in a first pass, the keep flag written to every member in a second).
Groups given as ids are sorted into segments in torch first (``advantages.segments_of``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NUM_WARPS
from .advantages import ELEMENT_BLOCK, segment_rows, segment_step, segment_steps, segments_of


@triton.jit
def _soft_overlong_penalty_kernel(
    len_ptr, out_ptr, N, stride, start, max_len, cache_len, factor,
    BLOCK: tl.constexpr,
):
    """Mirror of ``shaping._soft_overlong_penalty_torch`` in fp32, same operations in the same order.

    ``start``, ``max_len``, ``cache_len`` and ``factor`` arrive as fp32 scalars, which is what torch
    turns its Python-number operands into against an fp32 tensor; the lengths are converted to fp32
    first, as the reference does (so huge integer lengths round the same way).
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < N
    length = tl.load(len_ptr + offs * stride, mask=keep, other=0).to(tl.float32)
    # IEEE division, as torch's: Triton's plain "/" on fp32 is approximate on NVIDIA GPUs.
    ramp = tl.math.div_rn(factor * (start - length), cache_len)
    zero = tl.zeros_like(length)
    out = tl.where(length <= start, zero, tl.where(length <= max_len, ramp, zero - factor))
    tl.store(out_ptr + offs, out, mask=keep)


def soft_overlong_penalty_triton(lengths: torch.Tensor, max_len: int, cache_len: int, factor: float) -> torch.Tensor:
    """``soft_overlong_penalty`` on validated lengths (not fp64): fp32 ``[N]``."""
    n = lengths.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=lengths.device)
    if n == 0:
        return out
    _soft_overlong_penalty_kernel[(triton.cdiv(n, ELEMENT_BLOCK),)](
        lengths, out, n, lengths.stride(0),
        float(max_len - cache_len), float(max_len), float(cache_len), float(factor),
        BLOCK=ELEMENT_BLOCK, num_warps=NUM_WARPS,
    )
    return out


@triton.jit
def _dynamic_sampling_kernel(
    x_ptr, perm_ptr, offsets_ptr, out_ptr, K, G, stride_x,
    CONTIG: tl.constexpr, COMPUTE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Mirror of ``shaping._dynamic_sampling_mask_torch``: ``keep = max_g > min_g``, for every member.

    Values are compared in COMPUTE (fp32, or fp64 for fp64 rewards), the reference's dtype, so
    integer rewards that fp32 cannot tell apart count as equal in both. min and max are exact: no
    accumulation error, whatever the order.
    """
    pid = tl.program_id(0)
    rows, in_k, start, count = segment_rows(pid, offsets_ptr, K, G, CONTIG, ROWS)
    steps = segment_steps(count, BLOCK)
    lo = tl.full((ROWS, BLOCK), float("inf"), COMPUTE)
    hi = tl.full((ROWS, BLOCK), float("-inf"), COMPUTE)
    for s in range(0, steps):
        idx, keep = segment_step(s, start, count, perm_ptr, CONTIG, BLOCK)
        x = tl.load(x_ptr + idx * stride_x, mask=keep, other=0).to(COMPUTE)
        # absent lanes are neutral (+inf for the min, -inf for the max); loaded as 0 because an
        # integer load cannot take an infinite fill value
        lo = tl.minimum(lo, tl.where(keep, x, float("inf")))
        hi = tl.maximum(hi, tl.where(keep, x, float("-inf")))
    mixed = tl.max(hi, axis=1) > tl.min(lo, axis=1)
    for s in range(0, steps):  # second pass: every member of the group gets the group's flag
        idx, keep = segment_step(s, start, count, perm_ptr, CONTIG, BLOCK)
        tl.store(out_ptr + idx, (mixed[:, None] & keep).to(tl.uint8), mask=keep)


def dynamic_sampling_mask_triton(rewards: torch.Tensor, groups: int | torch.Tensor) -> torch.Tensor:
    """``dynamic_sampling_mask`` on validated inputs: bool ``[N]``."""
    n = rewards.shape[0]
    out = torch.empty(n, dtype=torch.uint8, device=rewards.device)
    if n == 0:
        return out.view(torch.bool)
    x = rewards.view(torch.uint8) if rewards.dtype == torch.bool else rewards  # Triton loads bytes, not i1
    seg = segments_of(groups, n, rewards.device)
    _, perm, offsets = seg.pointers(out)
    _dynamic_sampling_kernel[seg.grid](
        x, perm, offsets, out, seg.k, seg.size, x.stride(0),
        CONTIG=seg.contiguous, COMPUTE=tl.float64 if rewards.dtype == torch.float64 else tl.float32,
        ROWS=seg.rows, BLOCK=seg.block, num_warps=NUM_WARPS,
    )
    return out.view(torch.bool)
