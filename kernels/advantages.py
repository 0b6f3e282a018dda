"""Group-relative advantages in Triton, mirroring ``rlloss.advantages._group_advantages_torch``.

Groups are handled as *segments*: an int group size ``G`` means group ``g`` is the contiguous range
``[g*G, (g+1)*G)``; a tensor of ids is turned (in torch, once) into a dense index, a stable
permutation that sorts the samples by group, and segment offsets from the group sizes. A segment
program then reads its groups through the permutation. Every reduction runs in a fixed order
inside one program (no atomics), so results are bitwise reproducible run to run.

Launches, forward:

1. ``_group_stats_kernel``: per group, count, sum and mean (first pass over the segment), then the
   unbiased std from the squared deviations (second pass; skipped for ``scale="none"``).
2. ``_batch_stats_kernel`` (``scale="batch"`` only): one program, mean and unbiased std of all N.
3. ``_advantages_fwd_kernel``: elementwise ``A_i``.

Backward (gradient w.r.t. the rewards, derived from the reference formula, see
``_advantages_bwd_kernel``):

1. ``_group_grad_sums_kernel``: per group, the sum of the incoming gradient through the baseline
   and the sum of ``grad * A`` (what the std receives).
2. ``_sum_kernel`` (``scale="batch"`` only): one program adds the per-group ``grad * A`` sums.
3. ``_advantages_bwd_kernel``: elementwise gradient.

So 2 launches each way (3 with ``scale="batch"``).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from rlloss._groups import group_index

from ._common import NUM_WARPS

# A segment program holds at most this many samples per step: a 2-D tile of ROWS groups by BLOCK
# samples. Short groups are packed ROWS to a program (one program per group of 2 would leave the
# GPU mostly idle); a group longer than the tile gets a program of its own that loops over it.
SEGMENT_TILE = 1024
MIN_SEGMENT_BLOCK = 4
ELEMENT_BLOCK = 1024


# --- segments --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Segments:
    """The groups of ``n`` samples as ``k`` segments, plus the launch shape of a segment kernel.

    ``size > 0``: contiguous groups of that size, ``perm``/``offsets``/``index`` unused (None).
    ``size == 0``: ``index`` [n] dense group of each sample, ``perm`` [n] the samples sorted by group
    (stable), ``offsets`` [k+1] where each group's run starts in ``perm``.
    """

    n: int
    k: int
    size: int
    index: torch.Tensor | None
    perm: torch.Tensor | None
    offsets: torch.Tensor | None
    block: int
    rows: int

    @property
    def contiguous(self) -> bool:
        return self.size > 0

    @property
    def grid(self) -> tuple[int]:
        return (triton.cdiv(self.k, self.rows),)

    def pointers(self, dummy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, perm, offsets) kernel arguments; ``dummy`` stands in where the layout is contiguous."""
        if self.contiguous:
            return dummy, dummy, dummy
        return self.index, self.perm, self.offsets


def segments_of(groups: int | torch.Tensor, n: int, device: torch.device) -> Segments:
    """Segments for validated ``groups`` (an int size dividing ``n``, or an id tensor ``[n]``)."""
    if n >= 2**31:
        raise ValueError(f"the Triton kernels index samples with int32, got N={n}")
    if isinstance(groups, int):
        k, size, max_count = n // groups, groups, groups
        index = perm = offsets = None
    else:
        # The reference's dense numbering (sorted ids), so group g is the same group in both.
        index, k = group_index(groups, n, device)
        counts = torch.bincount(index, minlength=k)
        offsets = torch.zeros(k + 1, dtype=torch.int64, device=device)
        torch.cumsum(counts, 0, out=offsets[1:])
        perm = torch.argsort(index, stable=True)
        max_count = int(counts.max()) if k else 0
        size = 0
        index, perm, offsets = index.to(torch.int32), perm.to(torch.int32), offsets.to(torch.int32)
    block = min(SEGMENT_TILE, max(MIN_SEGMENT_BLOCK, triton.next_power_of_2(max(max_count, 1))))
    rows = max(1, min(SEGMENT_TILE // block, triton.next_power_of_2(max(k, 1))))
    return Segments(n=n, k=k, size=size, index=index, perm=perm, offsets=offsets, block=block, rows=rows)


@triton.jit
def segment_rows(pid, offsets_ptr, K, G, CONTIG: tl.constexpr, ROWS: tl.constexpr):
    """The ROWS groups of program ``pid``: ids, in-range flags, first position and size of each."""
    rows = pid * ROWS + tl.arange(0, ROWS)
    in_k = rows < K
    if CONTIG:
        start = rows * G
        count = tl.where(in_k, G, 0)
    else:
        start = tl.load(offsets_ptr + rows, mask=in_k, other=0)
        count = tl.load(offsets_ptr + rows + 1, mask=in_k, other=0) - start
    return rows, in_k, start, count


@triton.jit
def segment_step(step, start, count, perm_ptr, CONTIG: tl.constexpr, BLOCK: tl.constexpr):
    """Sample indices [ROWS, BLOCK] of step ``step`` along each segment, and which of them exist."""
    j = step * BLOCK + tl.arange(0, BLOCK)
    keep = j[None, :] < count[:, None]
    pos = start[:, None] + j[None, :]
    if CONTIG:
        idx = pos
    else:  # through the permutation: the samples of a group need not be adjacent in memory
        idx = tl.load(perm_ptr + pos, mask=keep, other=0)
    return idx, keep


@triton.jit
def segment_steps(count, BLOCK: tl.constexpr):
    """Steps of BLOCK that cover the longest segment of the program (a loop bound, not a shape)."""
    return tl.cdiv(tl.max(count, axis=0), BLOCK)


@triton.jit
def safe_sqrt(var):
    """Mirror of ``advantages._safe_sqrt``: sqrt for var > 0, else 0 (never sqrt of 0 or less)."""
    positive = var > 0
    return tl.where(positive, tl.sqrt_rn(tl.where(positive, var, 1.0)), 0.0)


# --- forward ---------------------------------------------------------------------------------------

@triton.jit
def _group_stats_kernel(
    x_ptr, perm_ptr, offsets_ptr, stats_ptr, K, G, stride_x,
    CONTIG: tl.constexpr, NEED_STD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Mirror of ``advantages._group_stats``: rows of ``stats`` [4, K] are count, sum, mean, std.

    Two passes over each segment, as the reference: the mean first, then the squared deviations
    from it (one-pass ``sum(x^2) - n*mean^2`` would cancel catastrophically for near-equal groups).
    """
    pid = tl.program_id(0)
    rows, in_k, start, count = segment_rows(pid, offsets_ptr, K, G, CONTIG, ROWS)
    steps = segment_steps(count, BLOCK)
    acc = tl.zeros((ROWS, BLOCK), tl.float32)
    for s in range(0, steps):
        idx, keep = segment_step(s, start, count, perm_ptr, CONTIG, BLOCK)
        acc += tl.load(x_ptr + idx * stride_x, mask=keep, other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=1)
    n = count.to(tl.float32)
    mean = tl.math.div_rn(total, tl.maximum(n, 1.0))  # every real group has n >= 1
    tl.store(stats_ptr + rows, n, mask=in_k)
    tl.store(stats_ptr + K + rows, total, mask=in_k)
    tl.store(stats_ptr + 2 * K + rows, mean, mask=in_k)
    if NEED_STD:
        sq = tl.zeros((ROWS, BLOCK), tl.float32)
        for s in range(0, steps):
            idx, keep = segment_step(s, start, count, perm_ptr, CONTIG, BLOCK)
            x = tl.load(x_ptr + idx * stride_x, mask=keep, other=0.0).to(tl.float32)
            d = tl.where(keep, x - mean[:, None], 0.0)
            sq += d * d
        q = tl.sum(sq, axis=1)
        var = tl.where(n > 1, tl.math.div_rn(q, tl.maximum(n - 1.0, 1.0)), 0.0)
        tl.store(stats_ptr + 3 * K + rows, safe_sqrt(var), mask=in_k)
    else:  # defined, not left as whatever the buffer held: the stats are an output of the op
        tl.store(stats_ptr + 3 * K + rows, tl.zeros((ROWS,), tl.float32), mask=in_k)


@triton.jit
def _batch_stats_kernel(x_ptr, out_ptr, N, stride_x, BLOCK: tl.constexpr):
    """Mirror of the reference's ``scale="batch"`` statistics, one program: out = [mean, std] of all N.

    ``var = sum((r - mean)^2) / max(N - 1, 1)``, std through ``safe_sqrt``. Blocks are added in
    order into a BLOCK-wide accumulator, reduced once at the end.
    """
    offs0 = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, N, BLOCK):
        offs = s + offs0
        acc += tl.load(x_ptr + offs * stride_x, mask=offs < N, other=0.0).to(tl.float32)
    n = tl.zeros((), tl.float32) + N  # N is an int argument (a constexpr when it is 1)
    mean = tl.math.div_rn(tl.sum(acc, axis=0), n)
    sq = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, N, BLOCK):
        offs = s + offs0
        keep = offs < N
        x = tl.load(x_ptr + offs * stride_x, mask=keep, other=0.0).to(tl.float32)
        d = tl.where(keep, x - mean, 0.0)
        sq += d * d
    var = tl.math.div_rn(tl.sum(sq, axis=0), tl.maximum(n - 1.0, 1.0))
    tl.store(out_ptr, mean)
    tl.store(out_ptr + 1, safe_sqrt(var))


@triton.jit
def _group_of(offs, gid_ptr, keep, G, CONTIG: tl.constexpr):
    if CONTIG:
        return offs // G
    else:
        return tl.load(gid_ptr + offs, mask=keep, other=0)


@triton.jit
def _denominator(alone, std, batch_ptr, eps, SCALE: tl.constexpr):
    """Mirror of the reference's ``denom``: group std + eps (1 for a singleton), batch std + eps, or 1."""
    if SCALE == 0:
        return tl.where(alone, 1.0, std + eps)
    elif SCALE == 1:
        return tl.zeros_like(std) + (tl.load(batch_ptr + 1) + eps)
    else:
        return tl.full(std.shape, 1.0, tl.float32)


@triton.jit
def _advantages_fwd_kernel(
    x_ptr, gid_ptr, stats_ptr, batch_ptr, adv_ptr, N, K, G, stride_x, eps,
    CONTIG: tl.constexpr, LOO: tl.constexpr, SCALE: tl.constexpr, KEEP_SINGLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Mirror of ``_group_advantages_torch`` per sample, same operations in the same order:
    ``b`` (mean, or leave-one-out ``(s - r) / max(n - 1, 1)``; 0 alone), ``A = (r - b) / denom``,
    then 0 for a singleton under ``singleton="zero"``. Divisions are IEEE round-to-nearest like
    torch's (Triton's plain ``/`` on fp32 is an approximate division on NVIDIA GPUs)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < N
    r = tl.load(x_ptr + offs * stride_x, mask=keep, other=0.0).to(tl.float32)
    g = _group_of(offs, gid_ptr, keep, G, CONTIG)
    n = tl.load(stats_ptr + g, mask=keep, other=1.0)
    alone = n == 1.0
    if LOO:
        b = tl.math.div_rn(tl.load(stats_ptr + K + g, mask=keep, other=0.0) - r, tl.maximum(n - 1.0, 1.0))
    else:
        b = tl.load(stats_ptr + 2 * K + g, mask=keep, other=0.0)  # the group mean, sum / count
    b = tl.where(alone, 0.0, b)
    if SCALE == 0:
        std = tl.load(stats_ptr + 3 * K + g, mask=keep, other=0.0)
    else:
        std = tl.zeros_like(r)
    adv = tl.math.div_rn(r - b, _denominator(alone, std, batch_ptr, eps, SCALE))
    if not KEEP_SINGLE:
        adv = tl.where(alone, 0.0, adv)
    tl.store(adv_ptr + offs, adv, mask=keep)


# --- backward --------------------------------------------------------------------------------------
# Reference, for a sample i of group g with n_g members (D_i its denominator, u_i = r_i - b_i,
# A_i = u_i / D_i, dA_i the incoming gradient, w_i = dA_i / D_i):
#   through the baseline:  mean: dr_k += w_k - sum_{i in g} w_i / n
#                          loo:  dr_k += w_k + w_k / (n-1) - sum_{i in g} w_i / (n-1)
#                          singleton: dr_k += w_k ("keep"; b = 0) or nothing ("zero")
#   through the group std (scale="group", std_g > 0):
#       dL/dstd_g = -sum_{i in g} dA_i A_i / D_g,  dstd_g/dr_k = (r_k - mean_g) / ((n-1) std_g)
#   through the batch std (scale="batch", std > 0), for every k, zeroed singletons included
#   (their rewards still enter the batch std):
#       dL/dstd = -sum_i dA_i A_i / D,  dstd/dr_k = (r_k - mean) / ((N-1) std)
# std = 0 (all-equal group or batch, group of one) gives the std path no gradient: safe_sqrt.
# The mean's own path into the variance is sum_j (r_j - mean) = 0 and is left out.
# The baseline sum adds w_i / n per sample, not (sum w_i) / n, as autograd of the reference does,
# so an all-equal group with a uniform incoming gradient gets exactly 0, as the reference's.

@triton.jit
def _group_grad_sums_kernel(
    dadv_ptr, adv_ptr, perm_ptr, offsets_ptr, stats_ptr, batch_ptr, sums_ptr, K, G, eps,
    CONTIG: tl.constexpr, LOO: tl.constexpr, SCALE: tl.constexpr, KEEP_SINGLE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per group, ``sums`` [2, K]: ``V_g = sum_i (dA_i / D_i) / nb`` (nb = n, or n-1 for loo) and
    ``P_g = sum_i dA_i * A_i`` (0 for a zeroed singleton, whose gradient ``where`` stops)."""
    pid = tl.program_id(0)
    rows, in_k, start, count = segment_rows(pid, offsets_ptr, K, G, CONTIG, ROWS)
    steps = segment_steps(count, BLOCK)
    n = tl.load(stats_ptr + rows, mask=in_k, other=1.0)
    alone = n == 1.0
    if SCALE == 0:
        std = tl.load(stats_ptr + 3 * K + rows, mask=in_k, other=0.0)
    else:
        std = tl.zeros((ROWS,), tl.float32)
    denom = _denominator(alone, std, batch_ptr, eps, SCALE)
    if LOO:
        nb = tl.maximum(n - 1.0, 1.0)
    else:
        nb = n
    v = tl.zeros((ROWS, BLOCK), tl.float32)
    p = tl.zeros((ROWS, BLOCK), tl.float32)
    for s in range(0, steps):
        idx, keep = segment_step(s, start, count, perm_ptr, CONTIG, BLOCK)
        da = tl.load(dadv_ptr + idx, mask=keep, other=0.0).to(tl.float32)
        v += tl.where(keep, tl.math.div_rn(tl.math.div_rn(da, denom[:, None]), nb[:, None]), 0.0)
        if SCALE != 2:
            p += da * tl.load(adv_ptr + idx, mask=keep, other=0.0)
    tl.store(sums_ptr + rows, tl.sum(v, axis=1), mask=in_k)
    p_sum = tl.sum(p, axis=1)
    if not KEEP_SINGLE:
        p_sum = tl.where(alone, 0.0, p_sum)
    tl.store(sums_ptr + K + rows, p_sum, mask=in_k)


@triton.jit
def _sum_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """One program: ``out[0] = sum(x[:N])``, blocks in order, one final reduction (deterministic)."""
    offs0 = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, N, BLOCK):
        offs = s + offs0
        acc += tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@triton.jit
def _advantages_bwd_kernel(
    dadv_ptr, x_ptr, gid_ptr, stats_ptr, batch_ptr, sums_ptr, ptotal_ptr, grad_ptr, N, K, G, stride_x, eps,
    CONTIG: tl.constexpr, LOO: tl.constexpr, SCALE: tl.constexpr, KEEP_SINGLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """d loss / d r_k from the reference formula (see the comment above), in the rewards' dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < N
    da = tl.load(dadv_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    r = tl.load(x_ptr + offs * stride_x, mask=keep, other=0.0).to(tl.float32)
    g = _group_of(offs, gid_ptr, keep, G, CONTIG)
    n = tl.load(stats_ptr + g, mask=keep, other=1.0)
    alone = n == 1.0
    if SCALE == 0:
        std = tl.load(stats_ptr + 3 * K + g, mask=keep, other=0.0)
    else:
        std = tl.zeros_like(r)
    denom = _denominator(alone, std, batch_ptr, eps, SCALE)
    w = tl.math.div_rn(da, denom)
    v = tl.load(sums_ptr + g, mask=keep, other=0.0)
    if LOO:
        through_baseline = w + tl.math.div_rn(w, tl.maximum(n - 1.0, 1.0)) - v
    else:
        through_baseline = w - v
    if KEEP_SINGLE:
        grad = tl.where(alone, w, through_baseline)
    else:
        grad = tl.where(alone, 0.0, through_baseline)
    if SCALE == 0:
        p = tl.load(sums_ptr + K + g, mask=keep, other=0.0)
        dev = r - tl.load(stats_ptr + 2 * K + g, mask=keep, other=0.0)
        positive = std > 0  # implies n > 1
        coef = -tl.math.div_rn(tl.math.div_rn(p, denom), tl.where(positive, (n - 1.0) * std, 1.0))
        grad += tl.where(positive, coef * dev, 0.0)
    elif SCALE == 1:
        std_all = tl.load(batch_ptr + 1)
        dev = r - tl.load(batch_ptr)
        positive = std_all > 0  # implies N > 1
        coef = -tl.math.div_rn(tl.math.div_rn(tl.load(ptotal_ptr), std_all + eps),
                               tl.where(positive, (N - 1.0) * std_all, 1.0))
        grad += tl.where(positive, coef * dev, 0.0)
    tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=keep)


# --- launch and autograd ---------------------------------------------------------------------------

def _segments(group_ids: torch.Tensor | None, group_size: int, n: int, device: torch.device) -> Segments:
    return segments_of(group_size if group_ids is None else group_ids, n, device)


def group_advantages_forward(rewards: torch.Tensor, group_ids: torch.Tensor | None, group_size: int, loo: bool,
                             scale: int, eps: float, keep_single: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(adv [N] fp32, stats [4, K], batch [2])``; groups are ``group_ids`` or, when None, contiguous
    runs of ``group_size``. ``stats`` and ``batch`` are what backward reads."""
    n = rewards.shape[0]
    dev = rewards.device
    adv = torch.empty(n, dtype=torch.float32, device=dev)
    batch = torch.zeros(2, dtype=torch.float32, device=dev)
    if n == 0:
        return adv, torch.empty((4, 0), dtype=torch.float32, device=dev), batch
    seg = _segments(group_ids, group_size, n, dev)
    flags = dict(CONTIG=seg.contiguous, LOO=loo, SCALE=scale, KEEP_SINGLE=keep_single)
    stats = torch.empty((4, seg.k), dtype=torch.float32, device=dev)
    index, perm, offsets = seg.pointers(stats)
    _group_stats_kernel[seg.grid](
        rewards, perm, offsets, stats, seg.k, seg.size, rewards.stride(0),
        CONTIG=seg.contiguous, NEED_STD=scale == 0, ROWS=seg.rows, BLOCK=seg.block, num_warps=NUM_WARPS,
    )
    if scale == 1:
        _batch_stats_kernel[(1,)](rewards, batch, n, rewards.stride(0), BLOCK=ELEMENT_BLOCK, num_warps=NUM_WARPS)
    _advantages_fwd_kernel[(triton.cdiv(n, ELEMENT_BLOCK),)](
        rewards, index, stats, batch, adv, n, seg.k, seg.size, rewards.stride(0), float(eps),
        **flags, BLOCK=ELEMENT_BLOCK, num_warps=NUM_WARPS,
    )
    return adv, stats, batch


def group_advantages_backward(dadv: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor | None,
                              group_size: int, adv: torch.Tensor, stats: torch.Tensor, batch: torch.Tensor, loo: bool,
                              scale: int, eps: float, keep_single: bool) -> torch.Tensor:
    """d loss / d rewards in the rewards' dtype, from the forward's ``adv``, ``stats`` and ``batch``."""
    n, dev = rewards.shape[0], rewards.device
    if n == 0:
        return torch.empty(0, dtype=rewards.dtype, device=dev)
    seg = _segments(group_ids, group_size, n, dev)
    dadv = dadv.to(torch.float32).contiguous()
    flags = dict(CONTIG=seg.contiguous, LOO=loo, SCALE=scale, KEEP_SINGLE=keep_single)
    sums = torch.empty((2, seg.k), dtype=torch.float32, device=dev)
    ptotal = torch.zeros(1, dtype=torch.float32, device=dev)
    index, perm, offsets = seg.pointers(stats)
    _group_grad_sums_kernel[seg.grid](
        dadv, adv, perm, offsets, stats, batch, sums, seg.k, seg.size, float(eps),
        **flags, ROWS=seg.rows, BLOCK=seg.block, num_warps=NUM_WARPS,
    )
    if scale == 1:
        _sum_kernel[(1,)](sums[1], ptotal, seg.k, BLOCK=ELEMENT_BLOCK, num_warps=NUM_WARPS)
    grad = torch.empty(n, dtype=rewards.dtype, device=dev)
    _advantages_bwd_kernel[(triton.cdiv(n, ELEMENT_BLOCK),)](
        dadv, rewards, index, stats, batch, sums, ptotal, grad, n, seg.k, seg.size, rewards.stride(0), float(eps),
        **flags, BLOCK=ELEMENT_BLOCK, num_warps=NUM_WARPS,
    )
    return grad
