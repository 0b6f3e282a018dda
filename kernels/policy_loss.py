"""Fused ``policy_loss``: one forward pass over the tokens, a small combine, a backward scale.

Launches (forward + backward), mirroring ``rlloss.loss._policy_loss_torch``:

1. (row-statistic objectives only: GSPO, VESPO, GMPO) ``_row_log_ratio_kernel``: per row chunk,
   the sums a row's tokens share (``N_STATS``, below): the log-ratio sum (GSPO's ``d``, VESPO's
   ``dc``, GMPO's clipped ``dm``), the token count, GMPO's advantage and log-weight sums, and the KL
   sum that sequence-level ``kl_bias_correction`` needs for its gradient through the row mean.
2. ``_policy_loss_fwd_kernel``: per row chunk, the per-token loss (surrogate + beta * k3), its
   gradient d l / d logp, stored for backward, and the chunk's partial sums: loss, token count,
   clip counts, ratio and KL sums, and the counts of valid positions with a non-finite input or a
   positive log-prob (the metrics come from this same pass).
3. ``_combine_kernel``: one program adds the partials in a fixed order (rows, then chunks; no
   atomics, so the result is bitwise reproducible), applies the aggregation's normaliser, and
   writes the loss, the metrics and the factors backward needs.
4. ``_scale_grad_kernel`` (backward): ``grad = grad_out * global_factor * row_factor[i] * g``.

So backward reads one stored [B, T] buffer instead of the inputs, and token-level objectives take
3 launches in all, row-statistic ones 4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from rlloss._constants import KL_INPUT_CLAMP, KL_KIND_CODES, LOG_OF_FLOOR, POSITIVE_LOGP_TOL, ROW_LOG_WEIGHT_MAX

from ._common import (
    _clamp,
    NUM_WARPS,
    OBJ_CISPO,
    OBJ_PPO,
    as_bytes,
    block_t,
    gmpo_log_ratio,
    grad_buffer_dtype,
    kl_token,
    objective_token,
)

# partial sums per chunk, in this order
N_PARTIALS = 10
LOSS, COUNT, CLIP_LOW, CLIP_HIGH, CLIP_DUAL, RATIO, KL, ENTROPY, NONFINITE, POSITIVE = range(N_PARTIALS)
# metrics the combine writes, in this order: clip_low, clip_high, clip_dual, ratio mean, KL mean, entropy mean
# (0 unless the pass had an entropy), valid tokens, valid positions with a non-finite input, valid positions
# with a log-prob > POSITIVE_LOGP_TOL
N_METRICS = 9
COMBINE_TILE = 1024
# The combine is one program: 8 warps share its tile (4 warps made ptxas spill 8 bytes on sm_80).
COMBINE_WARPS = 8
# row statistics per chunk (the pre-pass), in this order: the log-ratio sum, the token count, and
# GMPO's sums of A and of log(w + 1e-10) ([B, T] token weights), the KL sum (sequence-level bias
# correction: d/d logp_t of sum_s kl_s * r_i has sum_s kl_s * r_i / n_i in every token of the row)
N_STATS = 5
D_SUM, N_SUM, ADV_SUM, LOGW_SUM, KL_SUM = range(N_STATS)
# row_stat codes: 0 none, 1 GSPO (the row's mean log-ratio), 2 VESPO (its clamped sum), 3 GMPO
ROW_GSPO, ROW_VESPO, ROW_GMPO = 1, 2, 3
# the floor under a token weight before GMPO's geometric mean of [B, T] weights (verl)
GMPO_WEIGHT_FLOOR = 1e-10


@triton.jit
def _load_tokens(ptr, row, offs, stride_b, stride_t, in_row, valid):
    """fp32 values of one row chunk, 0 at masked or out-of-range positions.

    The load is predicated on the row bounds only, so contiguous rows load in 128-bit vectors (a
    per-token predicate would split them into scalar loads, and a GPU moves whole sectors anyway);
    masked positions are then selected out, so NaN or inf stored there never reaches any result.
    """
    x = tl.load(ptr + row * stride_b + offs * stride_t, mask=in_row, other=0.0).to(tl.float32)
    return tl.where(valid, x, 0.0)


@triton.jit
def _nonfinite(x):
    """True where ``x`` is NaN or +-inf (NaN fails every comparison)."""
    return ~(tl.abs(x) < INF_)


@triton.jit
def _row_log_ratio_kernel(
    logp_ptr, old_ptr, mask_ptr, adv_ptr, w_ptr, ref_ptr, stats_ptr,
    T, C, n_chunks_total,
    s_lp_b, s_lp_t, s_old_b, s_old_t, s_m_b, s_m_t, s_adv_b, s_adv_t, s_w_b, s_w_t, s_ref_b, s_ref_t,
    p0, p1, max_log_ratio, kl_clamp,
    ROW_STAT: tl.constexpr, ADV_PER_TOKEN: tl.constexpr, WEIGHTS: tl.constexpr, KL_SUM: tl.constexpr,
    KL_KIND: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """The chunk's row statistics (``N_STATS``): what ROW_STAT needs, and the KL sum with KL_SUM."""
    pid = tl.program_id(0)
    row = pid // C
    offs = (pid % C) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = offs < T
    valid = (tl.load(mask_ptr + row * s_m_b + offs * s_m_t, mask=in_row, other=0) != 0) & in_row
    logp = _load_tokens(logp_ptr, row, offs, s_lp_b, s_lp_t, in_row, valid)
    d = logp - _load_tokens(old_ptr, row, offs, s_old_b, s_old_t, in_row, valid)
    if ROW_STAT == 2:  # VESPO sums the clamped log-ratios
        d = _clamp(d, -max_log_ratio, max_log_ratio)
    if ROW_STAT == 3:  # GMPO: the clipped log-ratios, the advantages, the log token weights
        if ADV_PER_TOKEN:
            adv = _load_tokens(adv_ptr, row, offs, s_adv_b, s_adv_t, in_row, valid)
        else:
            adv = tl.where(valid, tl.load(adv_ptr + row * s_adv_b).to(tl.float32), 0.0)
        d, _ = gmpo_log_ratio(d, adv, p0, p1, max_log_ratio)
        tl.store(stats_ptr + ADV_SUM_ * n_chunks_total + pid, tl.sum(adv, axis=0))
        if WEIGHTS == 2:
            w = _load_tokens(w_ptr, row, offs, s_w_b, s_w_t, in_row, valid)
            logw = tl.where(valid, tl.log(w + GMPO_WEIGHT_FLOOR_), 0.0)
            tl.store(stats_ptr + LOGW_SUM_ * n_chunks_total + pid, tl.sum(logw, axis=0))
    if KL_SUM:
        ref = _load_tokens(ref_ptr, row, offs, s_ref_b, s_ref_t, in_row, valid)
        kl, _ = kl_token(logp, ref, kl_clamp, KL_KIND)
        tl.store(stats_ptr + KL_SUM_ * n_chunks_total + pid, tl.sum(tl.where(valid, kl, 0.0), axis=0))
    tl.store(stats_ptr + D_SUM_ * n_chunks_total + pid, tl.sum(tl.where(valid, d, 0.0), axis=0))
    tl.store(stats_ptr + N_SUM_ * n_chunks_total + pid, tl.sum(valid.to(tl.float32), axis=0))


@triton.jit
def _row_sum(stats_ptr, which, row, C, n_chunks_total, BLOCK_C: tl.constexpr):
    """A row's statistic: its chunks' partial sums added in chunk order (deterministic)."""
    chunks = tl.arange(0, BLOCK_C)
    return tl.sum(tl.load(stats_ptr + which * n_chunks_total + row * C + chunks, mask=chunks < C, other=0.0),
                  axis=0)


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, w_ptr, stats_ptr, grad_ptr, part_ptr, tok_loss_ptr, ent_ptr,
    T, C, n_chunks_total,
    s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_m_b, s_m_t, s_ref_b, s_ref_t, s_w_b, s_w_t,
    p0, p1, p2, p3, max_log_ratio, beta, kl_clamp,
    OBJ: tl.constexpr, DUAL_CLIP: tl.constexpr, DELTA: tl.constexpr, CLAMP_LOW: tl.constexpr,
    CLAMP_HIGH: tl.constexpr, ROW_STAT: tl.constexpr,
    HAS_OLD: tl.constexpr, ADV_PER_TOKEN: tl.constexpr, WEIGHTS: tl.constexpr,
    HAS_REF: tl.constexpr, ADD_KL: tl.constexpr, KL_KIND: tl.constexpr, KL_BIAS: tl.constexpr,
    WRITE_GRAD: tl.constexpr, WRITE_PARTIALS: tl.constexpr, WRITE_TOKEN_LOSS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, entropy_coef=0.0, HAS_ENTROPY: tl.constexpr = False,
):
    """ROW_STAT 0: none; 1: GSPO, d is the row's mean log-ratio; 2: VESPO, the row's clamped sum;
    3: GMPO, every valid token carries ``w_i * l_i`` (the combine's per-row mean gives it back) and
    d l_i / d logp_t times n_i (the row factor 1/n_i of the combine finishes it).
    WEIGHTS 0: none; 1: per row [B]; 2: per token [B, T] (GMPO: their geometric mean per row).
    KL_BIAS 0: none; 1: the KL term times the token's exp(dc); 2: times the row's exp(clamp(mean d)),
    the gradient through the row mean taking the row's KL sum from the pre-pass."""
    pid = tl.program_id(0)
    row = pid // C
    offs = (pid % C) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = offs < T
    valid = (tl.load(mask_ptr + row * s_m_b + offs * s_m_t, mask=in_row, other=0) != 0) & in_row

    logp = _load_tokens(logp_ptr, row, offs, s_lp_b, s_lp_t, in_row, valid)
    if HAS_OLD:
        old = _load_tokens(old_ptr, row, offs, s_old_b, s_old_t, in_row, valid)
    else:  # old_logp=None: sg(logp)
        old = logp
    if ADV_PER_TOKEN:
        adv = _load_tokens(adv_ptr, row, offs, s_adv_b, s_adv_t, in_row, valid)
    else:
        adv = tl.where(valid, tl.load(adv_ptr + row * s_adv_b).to(tl.float32), 0.0)

    d = logp - old
    lw = tl.zeros_like(d)
    n_row = tl.zeros((), tl.float32)
    if ROW_STAT != 0:
        d_sum = _row_sum(stats_ptr, D_SUM_, row, C, n_chunks_total, BLOCK_C)
        n_row = _row_sum(stats_ptr, N_SUM_, row, C, n_chunks_total, BLOCK_C)
        if ROW_STAT == 1:  # GSPO: every token carries the row's mean log-ratio s_i
            d = tl.where(valid, d_sum / tl.maximum(n_row, 1.0), 0.0)
        elif ROW_STAT == 2:  # VESPO: lw = clamp(sum_t m * dc, log 1e-8, 20)
            lw = tl.zeros_like(d) + _clamp(d_sum, LOG_OF_FLOOR_, ROW_LOG_WEIGHT_MAX_)

    if ROW_STAT == 3:  # GMPO: l_i = -Abar_i * rho_i, rho_i = exp(sum_t m*dm / n_i), 0 for an empty row
        inv_n = 1.0 / tl.maximum(n_row, 1.0)
        rho = tl.exp(tl.where(n_row > 0, d_sum * inv_n, 0.0))
        abar = _row_sum(stats_ptr, ADV_SUM_, row, C, n_chunks_total, BLOCK_C) * inv_n
        row_w = 1.0
        if WEIGHTS == 1:
            row_w = tl.load(w_ptr + row * s_w_b).to(tl.float32)
        elif WEIGHTS == 2:
            row_w = tl.exp(_row_sum(stats_ptr, LOGW_SUM_, row, C, n_chunks_total, BLOCK_C) * inv_n)
        _, ddm = gmpo_log_ratio(d, adv, p0, p1, max_log_ratio)
        loss = tl.zeros_like(d) + tl.where(n_row > 0, -abar * rho * row_w, 0.0)
        grad = -abar * rho * row_w * ddm
        ratio = tl.zeros_like(d) + rho
        low_hit = tl.zeros(d.shape, tl.int1)
        high_hit = low_hit
        dual_hit = low_hit
    else:
        loss, grad, ratio, low_hit, high_hit, dual_hit = objective_token(logp, old, d, adv, p0, p1, p2, p3, lw,
                                                                         max_log_ratio, OBJ, DUAL_CLIP, DELTA,
                                                                         CLAMP_LOW, CLAMP_HIGH)
        if WEIGHTS == 1:
            w = tl.where(valid, tl.load(w_ptr + row * s_w_b).to(tl.float32), 0.0)
            loss = loss * w
            grad = grad * w
        elif WEIGHTS == 2:
            w = _load_tokens(w_ptr, row, offs, s_w_b, s_w_t, in_row, valid)
            loss = loss * w
            grad = grad * w
    kl = tl.zeros_like(loss)
    if HAS_REF:
        ref = _load_tokens(ref_ptr, row, offs, s_ref_b, s_ref_t, in_row, valid)
        kl, dkl = kl_token(logp, ref, kl_clamp, KL_KIND)
        if KL_BIAS == 1:  # times exp(dc), not detached (token level)
            raw = logp - old
            bias = tl.exp(_clamp(raw, -max_log_ratio, max_log_ratio))
            passes = ((raw >= -max_log_ratio) & (raw <= max_log_ratio)).to(tl.float32)
            dkl = dkl * bias + kl * bias * passes
            kl = kl * bias
        elif KL_BIAS == 2:  # times the row's exp(clamp(mean d)) (d is GSPO's row mean): through the row mean
            bias = tl.exp(_clamp(d, -max_log_ratio, max_log_ratio))
            passes = ((d >= -max_log_ratio) & (d <= max_log_ratio)).to(tl.float32)
            kl_row = _row_sum(stats_ptr, KL_SUM_, row, C, n_chunks_total, BLOCK_C)
            dkl = dkl * bias + kl_row * bias * passes / tl.maximum(n_row, 1.0)
            kl = kl * bias
        if ADD_KL:
            loss = loss + beta * kl
            grad = grad + beta * dkl
    loss = tl.where(valid, loss, 0.0)
    grad = tl.where(valid, grad, 0.0)
    if HAS_ENTROPY:  # from logits: minus coef * entropy, aggregated as the loss (ent_ptr [B, T] fp32)
        ent = tl.where(valid, tl.load(ent_ptr + row * T + offs, mask=in_row, other=0.0), 0.0)
        loss = loss - entropy_coef * ent

    if WRITE_GRAD:  # contiguous [B, T] buffer: every in-range position written
        tl.store(grad_ptr + row * T + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_row)
    if WRITE_TOKEN_LOSS:
        tl.store(tok_loss_ptr + row * T + offs, loss, mask=in_row)
    if WRITE_PARTIALS:
        tl.store(part_ptr + LOSS_ * n_chunks_total + pid, tl.sum(loss, axis=0))
        tl.store(part_ptr + COUNT_ * n_chunks_total + pid, tl.sum(valid.to(tl.float32), axis=0))
        tl.store(part_ptr + CLIP_LOW_ * n_chunks_total + pid, tl.sum(tl.where(valid & low_hit, 1.0, 0.0), axis=0))
        tl.store(part_ptr + CLIP_HIGH_ * n_chunks_total + pid, tl.sum(tl.where(valid & high_hit, 1.0, 0.0), axis=0))
        tl.store(part_ptr + CLIP_DUAL_ * n_chunks_total + pid, tl.sum(tl.where(valid & dual_hit, 1.0, 0.0), axis=0))
        tl.store(part_ptr + RATIO_ * n_chunks_total + pid, tl.sum(tl.where(valid, ratio, 0.0), axis=0))
        tl.store(part_ptr + KL_ * n_chunks_total + pid, tl.sum(tl.where(valid, kl, 0.0), axis=0))
        if HAS_ENTROPY:
            tl.store(part_ptr + ENTROPY_ * n_chunks_total + pid, tl.sum(ent, axis=0))
        # inputs a loss should not see, counted (never changed): NaN/inf anywhere, a log-prob above 0
        nonfinite = _nonfinite(logp) | _nonfinite(adv)
        positive = logp > POSITIVE_LOGP_TOL_
        if HAS_OLD:
            nonfinite = nonfinite | _nonfinite(old)
            positive = positive | (old > POSITIVE_LOGP_TOL_)
        if HAS_REF:
            nonfinite = nonfinite | _nonfinite(ref)
            positive = positive | (ref > POSITIVE_LOGP_TOL_)
        if WEIGHTS != 0:
            if ROW_STAT == 3:  # GMPO takes its weights from the pre-pass: read here for the count only
                if WEIGHTS == 1:
                    nonfinite = nonfinite | _nonfinite(tl.zeros_like(d) + row_w)
                else:
                    nonfinite = nonfinite | _nonfinite(_load_tokens(w_ptr, row, offs, s_w_b, s_w_t, in_row, valid))
            else:
                nonfinite = nonfinite | _nonfinite(w)
        tl.store(part_ptr + NONFINITE_ * n_chunks_total + pid, tl.sum(tl.where(valid & nonfinite, 1.0, 0.0), axis=0))
        tl.store(part_ptr + POSITIVE_ * n_chunks_total + pid, tl.sum(tl.where(valid & positive, 1.0, 0.0), axis=0))


# partial indices as compile-time constants inside the kernels
LOSS_: tl.constexpr = tl.constexpr(LOSS)
COUNT_: tl.constexpr = tl.constexpr(COUNT)
CLIP_LOW_: tl.constexpr = tl.constexpr(CLIP_LOW)
CLIP_HIGH_: tl.constexpr = tl.constexpr(CLIP_HIGH)
CLIP_DUAL_: tl.constexpr = tl.constexpr(CLIP_DUAL)
RATIO_: tl.constexpr = tl.constexpr(RATIO)
KL_: tl.constexpr = tl.constexpr(KL)
ENTROPY_: tl.constexpr = tl.constexpr(ENTROPY)
NONFINITE_: tl.constexpr = tl.constexpr(NONFINITE)
POSITIVE_: tl.constexpr = tl.constexpr(POSITIVE)
POSITIVE_LOGP_TOL_: tl.constexpr = tl.constexpr(POSITIVE_LOGP_TOL)
INF_: tl.constexpr = tl.constexpr(float("inf"))
LOG_OF_FLOOR_: tl.constexpr = tl.constexpr(LOG_OF_FLOOR)
ROW_LOG_WEIGHT_MAX_: tl.constexpr = tl.constexpr(ROW_LOG_WEIGHT_MAX)
D_SUM_: tl.constexpr = tl.constexpr(D_SUM)
N_SUM_: tl.constexpr = tl.constexpr(N_SUM)
ADV_SUM_: tl.constexpr = tl.constexpr(ADV_SUM)
LOGW_SUM_: tl.constexpr = tl.constexpr(LOGW_SUM)
KL_SUM_: tl.constexpr = tl.constexpr(KL_SUM)
GMPO_WEIGHT_FLOOR_: tl.constexpr = tl.constexpr(GMPO_WEIGHT_FLOOR)


@triton.jit
def _safe_div(num, den):
    return tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)


@triton.jit
def _load_count(ptr, value, MODE: tl.constexpr):
    """A count given as nothing (MODE 0: caller's default), a number (1) or a 0-d tensor (2)."""
    if MODE == 2:
        return tl.load(ptr).to(tl.float32)
    else:
        return value


@triton.jit
def _combine_kernel(
    part_ptr, loss_ptr, metrics_ptr, factor_ptr, row_factor_ptr,
    B, C, n_chunks_total,
    num_tokens_ptr, num_tokens, num_seqs_ptr, num_seqs, max_tokens, dp_size,
    AGG: tl.constexpr, TOKENS_MODE: tl.constexpr, SEQS_MODE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_ENTROPY: tl.constexpr = False,
):
    """Single program: rows in blocks of BLOCK_R, each row's chunks summed in order."""
    rows0 = tl.arange(0, BLOCK_R)
    chunks = tl.arange(0, BLOCK_C)
    loss_sum = tl.zeros((), tl.float32)
    row_mean_sum = tl.zeros((), tl.float32)
    count = tl.zeros((), tl.float32)
    clip_low = tl.zeros((), tl.float32)
    clip_high = tl.zeros((), tl.float32)
    clip_dual = tl.zeros((), tl.float32)
    ratio = tl.zeros((), tl.float32)
    kl = tl.zeros((), tl.float32)
    ent = tl.zeros((), tl.float32)
    nonfinite = tl.zeros((), tl.float32)
    positive = tl.zeros((), tl.float32)
    for r0 in range(0, B, BLOCK_R):
        rows = r0 + rows0
        idx = rows[:, None] * C + chunks[None, :]
        keep = (rows[:, None] < B) & (chunks[None, :] < C)
        row_loss = tl.sum(tl.load(part_ptr + LOSS_ * n_chunks_total + idx, mask=keep, other=0.0), axis=1)
        row_count = tl.sum(tl.load(part_ptr + COUNT_ * n_chunks_total + idx, mask=keep, other=0.0), axis=1)
        loss_sum += tl.sum(row_loss, axis=0)
        count += tl.sum(row_count, axis=0)
        clip_low += tl.sum(tl.sum(tl.load(part_ptr + CLIP_LOW_ * n_chunks_total + idx, mask=keep, other=0.0), axis=1), axis=0)
        clip_high += tl.sum(tl.sum(tl.load(part_ptr + CLIP_HIGH_ * n_chunks_total + idx, mask=keep, other=0.0), axis=1), axis=0)
        clip_dual += tl.sum(tl.sum(tl.load(part_ptr + CLIP_DUAL_ * n_chunks_total + idx, mask=keep, other=0.0), axis=1), axis=0)
        ratio += tl.sum(tl.sum(tl.load(part_ptr + RATIO_ * n_chunks_total + idx, mask=keep, other=0.0), axis=1), axis=0)
        kl += tl.sum(tl.sum(tl.load(part_ptr + KL_ * n_chunks_total + idx, mask=keep, other=0.0), axis=1), axis=0)
        if HAS_ENTROPY:
            ent += tl.sum(tl.sum(tl.load(part_ptr + ENTROPY_ * n_chunks_total + idx, mask=keep, other=0.0), axis=1),
                          axis=0)
        nonfinite += tl.sum(tl.sum(tl.load(part_ptr + NONFINITE_ * n_chunks_total + idx, mask=keep, other=0.0), axis=1),
                            axis=0)
        positive += tl.sum(tl.sum(tl.load(part_ptr + POSITIVE_ * n_chunks_total + idx, mask=keep, other=0.0), axis=1),
                           axis=0)
        if AGG == 1:  # seq_mean_token_mean: each row normalised by its own count
            row_mean_sum += tl.sum(_safe_div(row_loss, row_count), axis=0)
            tl.store(row_factor_ptr + rows, _safe_div(1.0, row_count), mask=rows < B)
        else:
            tl.store(row_factor_ptr + rows, tl.full((BLOCK_R,), 1.0, tl.float32), mask=rows < B)

    n_tok = _load_count(num_tokens_ptr, num_tokens, TOKENS_MODE)
    if TOKENS_MODE == 0:
        n_tok = count
    n_seq = _load_count(num_seqs_ptr, num_seqs, SEQS_MODE)
    if AGG == 0:
        loss = _safe_div(loss_sum, n_tok)
        factor = _safe_div(1.0, n_tok)
    elif AGG == 1:
        loss = _safe_div(row_mean_sum, n_seq)
        factor = _safe_div(1.0, n_seq)
    elif AGG == 2:
        loss = _safe_div(loss_sum, n_seq)
        factor = _safe_div(1.0, n_seq)
    elif AGG == 3:
        loss = _safe_div(loss_sum, n_seq * max_tokens)
        factor = _safe_div(1.0, n_seq * max_tokens)
    else:  # token_sum
        loss = loss_sum
        factor = tl.full((), 1.0, tl.float32)
    tl.store(loss_ptr, loss * dp_size)
    tl.store(metrics_ptr + 0, _safe_div(clip_low, count))
    tl.store(metrics_ptr + 1, _safe_div(clip_high, count))
    tl.store(metrics_ptr + 2, _safe_div(clip_dual, count))
    tl.store(metrics_ptr + 3, _safe_div(ratio, count))
    tl.store(metrics_ptr + 4, _safe_div(kl, count))
    tl.store(metrics_ptr + 5, _safe_div(ent, count))
    tl.store(metrics_ptr + 6, count)  # the valid tokens of the call (metrics["num_tokens"])
    tl.store(metrics_ptr + 7, nonfinite)  # metrics["nonfinite_inputs"]
    tl.store(metrics_ptr + 8, positive)  # metrics["positive_logp"]
    tl.store(factor_ptr, factor * dp_size)


@triton.jit
def _scale_grad_kernel(
    g_ptr, grad_out_ptr, factor_ptr, row_factor_ptr, out_ptr, T, C,
    BLOCK_T: tl.constexpr,
):
    """grad[i, t] = grad_out * factor * row_factor[i] * g[i, t], all contiguous [B, T]."""
    pid = tl.program_id(0)
    row = pid // C
    offs = (pid % C) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = offs < T
    scale = tl.load(grad_out_ptr).to(tl.float32) * tl.load(factor_ptr) * tl.load(row_factor_ptr + row)
    g = tl.load(g_ptr + row * T + offs, mask=in_row, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * T + offs, (g * scale).to(out_ptr.dtype.element_ty), mask=in_row)


def _strides(x: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if x is None else (x.stride(0), x.stride(1))


def _count_args(tensor: torch.Tensor | None, value: float, default: float,
                like: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(pointer, value, mode) for a count passed as a 0-d tensor, a number (>= 0) or nothing (< 0)."""
    if tensor is not None:
        return tensor, 0.0, 2
    if value < 0:
        return like, float(default), 0
    return like, float(value), 1


def per_token_pass(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    *,
    objective: int,
    dual_or_low: bool,
    delta_or_high: bool,
    params: list[float],
    row_stat: int,
    beta: float,
    kl_kind: int = KL_KIND_CODES["k3"],
    kl_bias_correction: bool = False,
    token_weights: torch.Tensor | None = None,
    max_log_ratio: float,
    write_grad: bool,
    write_partials: bool,
    write_token_loss: bool,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, int]:
    """Launch the row-statistics (GSPO, VESPO, GMPO) and per-token kernels. Returns (g, partials, token_loss, C).

    ``kl_bias_correction`` is at sequence level with GSPO's row statistic (``PPO(level="sequence")``,
    as ``rlloss.loss.bias_correction_ratio``), else at token level.
    """
    B, T = logp.shape
    bt = block_t(T)
    C = triton.cdiv(T, bt)
    n = B * C
    dev = logp.device
    mask_u8 = as_bytes(mask)
    g = torch.empty((B, T), dtype=grad_buffer_dtype(logp.dtype), device=dev) if write_grad else None
    partials = torch.empty((N_PARTIALS, max(n, 1)), dtype=torch.float32, device=dev) if write_partials else None
    token_loss = torch.empty((B, T), dtype=torch.float32, device=dev) if write_token_loss else None
    if n == 0:
        return g, partials, token_loss, C
    old = logp if old_logp is None else old_logp
    has_kl_bias = ref_logp is not None and kl_bias_correction
    kl_bias = 0 if not has_kl_bias else 2 if row_stat == ROW_GSPO else 1
    per_token_adv = adv.dim() == 2
    adv_strides = _strides(adv) if per_token_adv else (adv.stride(0), 0)
    weights_mode = 0 if token_weights is None else token_weights.dim()
    w_strides = (0, 0) if token_weights is None else (
        _strides(token_weights) if weights_mode == 2 else (token_weights.stride(0), 0))
    dummy = logp  # pointer for arguments a constexpr switch leaves unread
    stats = torch.empty((N_STATS, n), dtype=torch.float32, device=dev) if row_stat else None
    if row_stat:
        _row_log_ratio_kernel[(n,)](
            logp, old, mask_u8, adv, dummy if token_weights is None else token_weights,
            dummy if ref_logp is None else ref_logp, stats, T, C, n,
            *_strides(logp), *_strides(old), *_strides(mask_u8), *adv_strides, *w_strides, *_strides(ref_logp),
            float(params[0]), float(params[1]), float(max_log_ratio), KL_INPUT_CLAMP,
            ROW_STAT=row_stat, ADV_PER_TOKEN=per_token_adv, WEIGHTS=weights_mode, KL_SUM=kl_bias == 2,
            KL_KIND=kl_kind, BLOCK_T=bt, num_warps=NUM_WARPS,
        )
    _policy_loss_fwd_kernel[(n,)](
        logp, old, adv, mask_u8, dummy if ref_logp is None else ref_logp,
        dummy if token_weights is None else token_weights, stats if row_stat else dummy,
        dummy if g is None else g, dummy if partials is None else partials, dummy if token_loss is None else token_loss,
        dummy if entropy is None else entropy, T, C, n,
        *_strides(logp), *_strides(old), *adv_strides, *_strides(mask_u8), *_strides(ref_logp), *w_strides,
        *(float(p) for p in params), float(max_log_ratio), float(beta), KL_INPUT_CLAMP,
        OBJ=objective, DUAL_CLIP=objective == OBJ_PPO and dual_or_low, DELTA=objective == OBJ_PPO and delta_or_high,
        CLAMP_LOW=objective == OBJ_CISPO and dual_or_low, CLAMP_HIGH=objective == OBJ_CISPO and delta_or_high,
        ROW_STAT=row_stat,
        HAS_OLD=old_logp is not None, ADV_PER_TOKEN=per_token_adv, WEIGHTS=weights_mode,
        HAS_REF=ref_logp is not None, ADD_KL=ref_logp is not None and beta != 0, KL_KIND=kl_kind,
        KL_BIAS=kl_bias,
        WRITE_GRAD=write_grad, WRITE_PARTIALS=write_partials, WRITE_TOKEN_LOSS=write_token_loss,
        BLOCK_T=bt, BLOCK_C=triton.next_power_of_2(C), entropy_coef=float(entropy_coef),
        HAS_ENTROPY=entropy is not None, num_warps=NUM_WARPS,
    )
    return g, partials, token_loss, C


def combine_block_rows(c: int) -> int:
    """Rows per step of the single-program combine: 1024 partials of each of its 9 sums (10 with
    the entropy) in flight.

    A 4096 tile held 224 loads per thread and needed up to 255 registers on sm_90a (the limit);
    1024 keeps the combine well clear of spilling, and it runs once per call on B*C partials.
    """
    return max(1, COMBINE_TILE // triton.next_power_of_2(max(c, 1)))


def scale_grad(g: torch.Tensor, grad_out: torch.Tensor, factor: torch.Tensor, row_factor: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    B, T = g.shape
    out = torch.empty((B, T), dtype=dtype, device=g.device)
    bt = block_t(T)
    C = triton.cdiv(T, bt)
    if B * C:
        _scale_grad_kernel[(B * C,)](g, grad_out, factor, row_factor, out, T, C, BLOCK_T=bt, num_warps=NUM_WARPS)
    return out


def policy_loss_forward(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    num_tokens: torch.Tensor | None,
    num_seqs: torch.Tensor | None,
    *,
    objective: int,
    dual_or_low: bool,
    delta_or_high: bool,
    params: list[float],
    row_stat: int,
    beta: float,
    kl_kind: int,
    kl_bias_correction: bool,
    max_log_ratio: float,
    aggregation: int,
    max_tokens: float,
    num_tokens_value: float,
    num_seqs_value: float,
    dp_size: int,
    needs_grad: bool,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused ``policy_loss`` forward: ``(loss, metrics[N_METRICS], g, factor[1], row_factor[max(B, 1)])``.

    Metrics: clip_low, clip_high, clip_dual (the objective's three indicators), ratio mean, KL mean,
    entropy mean, valid tokens, and the counts of valid positions where an input is not finite
    (``logp``, ``old_logp``, ``ref_logp``, ``adv``, ``token_weights``) or a log-prob is above
    ``POSITIVE_LOGP_TOL``. With ``entropy`` (contiguous fp32 ``[B, T]``, from logits) the loss gains
    ``- entropy_coef * entropy`` per token, aggregated with the same normaliser.

    ``g`` is d loss / d logp before the normaliser (``grad_buffer_dtype``; empty without
    ``needs_grad``); backward is ``scale_grad(g, grad_loss, factor, row_factor)``. Counts come as a
    tensor, or a number (``< 0``: not given).
    """
    B, _ = logp.shape
    g, partials, _, C = per_token_pass(
        logp, old_logp, adv, mask, ref_logp, objective=objective, dual_or_low=dual_or_low,
        delta_or_high=delta_or_high, params=params, row_stat=row_stat, beta=beta, kl_kind=kl_kind,
        kl_bias_correction=kl_bias_correction, token_weights=token_weights, max_log_ratio=max_log_ratio,
        write_grad=needs_grad, write_partials=True, write_token_loss=False, entropy=entropy, entropy_coef=entropy_coef,
    )
    dev = logp.device
    loss = torch.empty((), dtype=torch.float32, device=dev)
    metrics = torch.empty(N_METRICS, dtype=torch.float32, device=dev)
    factor = torch.empty(1, dtype=torch.float32, device=dev)
    row_factor = torch.empty(max(B, 1), dtype=torch.float32, device=dev)
    tok_ptr, tok_val, tok_mode = _count_args(num_tokens, num_tokens_value, 0.0, factor)
    seq_ptr, seq_val, seq_mode = _count_args(num_seqs, num_seqs_value, B, factor)
    _combine_kernel[(1,)](
        partials, loss, metrics, factor, row_factor, B, C, B * C,
        tok_ptr, tok_val, seq_ptr, seq_val, float(max_tokens), float(dp_size),
        AGG=aggregation, TOKENS_MODE=tok_mode, SEQS_MODE=seq_mode,
        BLOCK_R=combine_block_rows(C), BLOCK_C=triton.next_power_of_2(max(C, 1)), HAS_ENTROPY=entropy is not None,
        num_warps=COMBINE_WARPS,
    )
    if g is None:
        g = logp.new_empty(0)
    return loss, metrics, g, factor, row_factor
