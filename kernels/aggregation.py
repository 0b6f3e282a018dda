"""``masked_mean``: chunked masked row sums, a per-row combine in fixed order, a backward scale.

The reduced dimension is moved last and the rest flattened into rows ``[R, L]`` (``dim=None``:
one row of every element). Long rows are split into chunks so a few rows still fill the GPU;
each row's chunk partials are added in order by one program per row: no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NUM_WARPS, as_bytes, block_t


@triton.jit
def _masked_sum_kernel(x_ptr, mask_ptr, part_ptr, L, C, n_chunks_total, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // C
    offs = (pid % C) * BLOCK + tl.arange(0, BLOCK)
    valid = (tl.load(mask_ptr + row * L + offs, mask=offs < L, other=0) != 0) & (offs < L)
    # predicated on the row bounds only (128-bit loads), masked positions selected out after
    x = tl.where(valid, tl.load(x_ptr + row * L + offs, mask=offs < L, other=0.0).to(tl.float32), 0.0)
    tl.store(part_ptr + pid, tl.sum(x, axis=0))
    tl.store(part_ptr + n_chunks_total + pid, tl.sum(valid.to(tl.float32), axis=0))


@triton.jit
def _masked_mean_combine_kernel(part_ptr, norm_ptr, norm_value, out_ptr, den_ptr, C, n_chunks_total,
                                NORM_MODE: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per row. NORM_MODE 0: the row's count; 1: a number; 2: a tensor per row."""
    row = tl.program_id(0)
    total = tl.zeros((), tl.float32)
    count = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        keep = chunks < C
        total += tl.sum(tl.load(part_ptr + row * C + chunks, mask=keep, other=0.0), axis=0)
        count += tl.sum(tl.load(part_ptr + n_chunks_total + row * C + chunks, mask=keep, other=0.0), axis=0)
    if NORM_MODE == 0:
        den = count
    elif NORM_MODE == 1:
        den = norm_value + tl.zeros((), tl.float32)
    else:
        den = tl.load(norm_ptr + row).to(tl.float32)
    ok = den > 0
    tl.store(out_ptr + row, tl.where(ok, total / tl.where(ok, den, 1.0), 0.0))
    tl.store(den_ptr + row, den)


@triton.jit
def _masked_mean_bwd_kernel(mask_ptr, grad_out_ptr, den_ptr, out_ptr, L, C, BLOCK: tl.constexpr):
    """d mean / d x = 1/den at valid positions, 0 elsewhere (and 0 for every x when den is 0)."""
    pid = tl.program_id(0)
    row = pid // C
    offs = (pid % C) * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < L
    valid = (tl.load(mask_ptr + row * L + offs, mask=in_row, other=0) != 0) & in_row
    den = tl.load(den_ptr + row)
    go = tl.load(grad_out_ptr + row).to(tl.float32)
    ok = den > 0
    scale = tl.where(ok, go / tl.where(ok, den, 1.0), 0.0)
    grad = tl.where(valid, scale + tl.zeros((BLOCK,), tl.float32), 0.0)
    tl.store(out_ptr + row * L + offs, grad.to(out_ptr.dtype.element_ty), mask=in_row)


def _rows(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``t`` as contiguous ``[R, L]`` with the reduced dimension last."""
    if dim is None:
        return t.reshape(1, -1).contiguous()
    moved = t.movedim(dim, -1)
    rows = 1
    for size in moved.shape[:-1]:
        rows *= size
    return moved.reshape(rows, moved.shape[-1]).contiguous()  # explicit: -1 is ambiguous when L = 0


def reduced_shape(shape: torch.Size | list[int], dim: int | None) -> list[int]:
    """The result shape of a reduction over ``dim`` (all dimensions for None)."""
    if dim is None:
        return []
    dims = list(shape)
    del dims[dim]
    return dims


def masked_mean_forward(x: torch.Tensor, mask: torch.Tensor, dim: int | None, normalizer: torch.Tensor | None,
                        normalizer_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, den)``: fp32 of the reduced shape, and the fp32 normaliser per row ``[max(R, 1)]``.

    The normaliser is a tensor broadcastable to the result, a number (``>= 0``) or, with
    ``normalizer_value < 0`` and no tensor, each row's count of valid elements.
    """
    out_shape = reduced_shape(x.shape, dim)
    xr = _rows(x, dim)
    mr = _rows(as_bytes(mask), dim)
    R, L = xr.shape
    bt = block_t(L)
    C = triton.cdiv(L, bt)
    dev = x.device
    out = torch.empty(max(R, 1), dtype=torch.float32, device=dev)
    den = torch.empty(max(R, 1), dtype=torch.float32, device=dev)
    partials = torch.empty((2, max(R * C, 1)), dtype=torch.float32, device=dev)
    if normalizer is not None:
        norm, norm_value, mode = normalizer.to(torch.float32).expand(out_shape).reshape(-1).contiguous(), 0.0, 2
    elif normalizer_value < 0:
        norm, norm_value, mode = den, 0.0, 0
    else:
        norm, norm_value, mode = den, float(normalizer_value), 1
    if R * C:
        _masked_sum_kernel[(R * C,)](xr, mr, partials, L, C, R * C, BLOCK=bt, num_warps=NUM_WARPS)
    if R:
        _masked_mean_combine_kernel[(R,)](
            partials, norm, norm_value, out, den, C, R * C, NORM_MODE=mode,
            BLOCK_C=min(1024, triton.next_power_of_2(max(C, 1))), num_warps=NUM_WARPS,
        )
    return out[:R].reshape(out_shape).clone() if R != out.shape[0] else out.reshape(out_shape), den


def masked_mean_backward(grad_out: torch.Tensor, mask: torch.Tensor, den: torch.Tensor, dim: int | None,
                         dtype: torch.dtype) -> torch.Tensor:
    """d mean / d x, shaped as ``mask``, in ``dtype``: ``grad_out / den`` at valid positions, else 0."""
    mr = _rows(as_bytes(mask), dim)
    R, L = mr.shape
    bt = block_t(L)
    C = triton.cdiv(L, bt)
    grad = torch.empty((R, L), dtype=dtype, device=mr.device)
    if R * C:
        _masked_mean_bwd_kernel[(R * C,)](mr, grad_out.reshape(-1).contiguous(), den, grad, L, C, BLOCK=bt,
                                          num_warps=NUM_WARPS)
    if dim is None:
        return grad.reshape(mask.shape)
    moved_shape = list(mask.shape)
    moved_shape.append(moved_shape.pop(dim))
    return grad.reshape(moved_shape).movedim(-1, dim).contiguous()
