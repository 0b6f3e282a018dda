"""Pieces every rlloss kernel module shares: launch sizes, dtype rules and the per-token PPO math."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlloss._constants import FUSED_OBJECTIVES, LOG_FLOOR, OBJECTIVE_CODES

LOG_FLOOR_: tl.constexpr = tl.constexpr(LOG_FLOOR)

# A program handles one chunk of one row: long rows are split so a few of them still fill the GPU,
# and a row's chunks are combined in a fixed order afterwards (no atomics: bitwise deterministic).
MAX_BLOCK_T = 1024
NUM_WARPS = 4


def block_t(t: int) -> int:
    """Tokens per program: the row length rounded up to a power of two, capped at MAX_BLOCK_T."""
    return max(16, min(MAX_BLOCK_T, triton.next_power_of_2(max(t, 1))))


def grad_buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-token gradient the forward pass stores for backward.

    bf16 has fp32's exponent range, so an unnormalised gradient stored in bf16 cannot overflow,
    and the final bf16 gradient is at most one extra rounding away: half the bytes of fp32. fp16
    could overflow (ratios up to e^20 before the normaliser), so it keeps fp32.
    """
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def as_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask seen as uint8 (a view, no copy): Triton loads bytes, bool pointers are awkward."""
    return mask.view(torch.uint8)


@triton.jit
def tie_weight(a, b):
    """Share of the gradient ``torch.minimum(a, b)`` sends to ``a``: 1, 0, or 1/2 on a tie."""
    return tl.where(a < b, 1.0, tl.where(a == b, 0.5, 0.0))


NAN_ALL = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def _clamp(x, lo, hi):
    """torch.clamp: NaN stays NaN (Triton's min/max drop NaN by default)."""
    return tl.minimum(tl.maximum(x, lo, propagate_nan=NAN_ALL), hi, propagate_nan=NAN_ALL)


@triton.jit
def all_false(x):
    """An all-False block shaped like x (x != x would be True where x is NaN)."""
    return tl.zeros(x.shape, tl.int1)


# objective codes of the fused per-token kernel (compile-time switches, one binary each)
# (GMPO is per row: the policy-loss kernel runs it from its row statistics, not through objective_token)
OBJ_PPO, OBJ_CISPO, OBJ_SAPO, OBJ_REINFORCE, OBJ_DPPO_TV, OBJ_DPPO_KL, OBJ_DRO, OBJ_VESPO, OBJ_GMPO = (
    OBJECTIVE_CODES[name] for name in FUSED_OBJECTIVES)
PPO_, CISPO_, SAPO_, REINFORCE_, DPPO_TV_, DPPO_KL_, DRO_, VESPO_ = (
    tl.constexpr(code) for code in (OBJ_PPO, OBJ_CISPO, OBJ_SAPO, OBJ_REINFORCE, OBJ_DPPO_TV, OBJ_DPPO_KL, OBJ_DRO,
                                    OBJ_VESPO))


@triton.jit
def objective_token(logp, old, d, adv, p0, p1, p2, p3, lw, max_log_ratio, OBJ: tl.constexpr,
                    DUAL_CLIP: tl.constexpr, DELTA: tl.constexpr, CLAMP_LOW: tl.constexpr, CLAMP_HIGH: tl.constexpr):
    """Mirror of the objectives' ``token_loss`` (``rlloss.objectives``), with d loss / d logp.

    ``d`` is the log-ratio (the row mean for GSPO), ``lw`` VESPO's row log-weight. The four
    parameter slots take the objective's numbers, named at the top of its branch (the dispatch
    layer's ``objective_switches`` fills them); ``DUAL_CLIP``/``DELTA`` (PPO) and
    ``CLAMP_LOW``/``CLAMP_HIGH`` (CISPO) say which optional bounds are set. Returns loss, gradient,
    ratio (for the metric) and the three metric indicators (PPO clip_low, clip_high, clip_dual;
    CISPO clip_low, clip_high; DPPO outside_region in the first).
    """
    # NaN propagates through every clamp and min, as in torch: a NaN at a valid token must surface
    dc = _clamp(d, -max_log_ratio, max_log_ratio)
    passes_clamp = ((d >= -max_log_ratio) & (d <= max_log_ratio)).to(tl.float32)
    ratio = tl.exp(dc)
    low_hit = all_false(d)
    high_hit = low_hit
    dual_hit = low_hit
    if OBJ == PPO_:  # with delta and dual clip
        ratio_low, ratio_high, dual_clip, delta = p0, p1, p2, p3  # 1 - eps_low, 1 + eps_high, c, delta
        if DELTA:
            unclipped = tl.minimum(ratio, delta, propagate_nan=NAN_ALL)
            d_unclipped = (ratio <= delta).to(tl.float32)
        else:
            unclipped = ratio
            d_unclipped = tl.full(ratio.shape, 1.0, tl.float32)
        clipped = _clamp(ratio, ratio_low, ratio_high)
        passes_clip = ((ratio >= ratio_low) & (ratio <= ratio_high)).to(tl.float32)
        unclipped_term = unclipped * adv
        clipped_term = clipped * adv
        w = tie_weight(unclipped_term, clipped_term)
        loss = -tl.minimum(unclipped_term, clipped_term, propagate_nan=NAN_ALL)
        dloss_dratio = -adv * (w * d_unclipped + (1.0 - w) * passes_clip)
        negative = adv < 0
        low_hit = (ratio < ratio_low) & negative
        high_hit = (ratio > ratio_high) & (adv > 0)
        if DUAL_CLIP:
            bound = -dual_clip * adv
            dual_hit = negative & (loss > bound)
            dloss_dratio = tl.where(negative, dloss_dratio * tie_weight(loss, bound), dloss_dratio)
            loss = tl.where(negative, tl.minimum(loss, bound, propagate_nan=NAN_ALL), loss)
        grad = dloss_dratio * ratio * passes_clamp
    elif OBJ == CISPO_:  # -sg(clamp(r, low, high)) * A * logp
        low, high = p0, p1
        weight = ratio
        if CLAMP_LOW:
            weight = tl.maximum(weight, low, propagate_nan=NAN_ALL)
            low_hit = ratio < low
        if CLAMP_HIGH:
            weight = tl.minimum(weight, high, propagate_nan=NAN_ALL)
            high_hit = ratio > high
        loss = -weight * adv * logp
        grad = -weight * adv
    elif OBJ == SAPO_:  # -A * (4/tau) * sigmoid(tau * (r - 1))
        tau_pos, tau_neg = p0, p1
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        loss = -adv * (4.0 / tau) * gate
        grad = -adv * 4.0 * gate * (1.0 - gate) * ratio * passes_clamp
    elif OBJ == REINFORCE_:  # -A * logp
        loss = -adv * logp
        grad = -adv
    elif OBJ == DRO_:  # -(A * logp - beta/2 * d^2), d unclamped
        beta = p0
        loss = -(adv * logp - beta / 2.0 * d * d)
        grad = -(adv - beta * d)
    elif OBJ == VESPO_:  # -sg(phi) * A * logp
        k_pos, lam_pos, k_neg, lam_neg = p0, p1, p2, p3
        w_row = tl.exp(lw)
        positive = adv >= 0
        k = tl.where(positive, k_pos, k_neg)
        lam = tl.where(positive, lam_pos, lam_neg)
        phi = tl.exp(lam + k * lw - lam * w_row)
        loss = -phi * adv * logp
        grad = -phi * adv
        ratio = w_row
    else:  # DPPO (total variation or binary KL): -A * w * sg(ok) * logp
        low, high, weight_cap = p0, p1, p2
        weight = tl.minimum(ratio, weight_cap, propagate_nan=NAN_ALL)
        p = tl.exp(logp)
        q = tl.exp(old)
        if OBJ == DPPO_TV_:
            ok_pos = p - q <= high
            ok_neg = p - q >= -low
        else:
            b = q * (old - logp) + (1.0 - q) * tl.log((1.0 - q + LOG_FLOOR_) / (1.0 - p + LOG_FLOOR_))
            ok_pos = (b <= high) | (p <= q)
            ok_neg = (b <= low) | (p >= q)
        ok = tl.where(adv > 0, ok_pos, ok_neg)
        low_hit = ok == 0
        loss = -adv * weight * ok.to(tl.float32) * logp
        grad = -adv * weight * ok.to(tl.float32)
    return loss, grad, ratio, low_hit, high_hit, dual_hit


@triton.jit
def gmpo_log_ratio(d, adv, log_clip_low, log_clip_high, max_log_ratio):
    """Mirror of ``GMPO.row_loss``'s per-token term: ``dm = s*min(s*dc, s*dl)`` and d dm / d d.

    ``s = sign(A)``, ``dc`` the log-ratio clamped at ``max_log_ratio``, ``dl = clamp(dc, -low, high)``;
    the gradient is torch's: 0 where the bound ``min`` selects binds, half each way on a tie, and 0
    where ``A = 0`` (``s*s``).
    """
    dc = _clamp(d, -max_log_ratio, max_log_ratio)
    passes_clamp = ((d >= -max_log_ratio) & (d <= max_log_ratio)).to(tl.float32)
    s = tl.where(adv > 0, 1.0, tl.where(adv < 0, -1.0, 0.0))
    dl = _clamp(dc, -log_clip_low, log_clip_high)
    passes_clip = ((dc >= -log_clip_low) & (dc <= log_clip_high)).to(tl.float32)
    a = s * dc
    b = s * dl
    w = tie_weight(a, b)
    dm = s * tl.minimum(a, b, propagate_nan=NAN_ALL)
    return dm, s * s * passes_clamp * (w + (1.0 - w) * passes_clip)


@triton.jit
def kl_token(logp, ref, clamp, KIND: tl.constexpr):
    """Mirror of ``kl._kl_terms``: the value and d value / d logp for kinds 1..7 (``KL_KIND_CODES``).

    Kinds 5..7 ("k1+", "k3+", "abs+") take the value of kind - 4 and k2's gradient.
    """
    diff = logp - ref
    if KIND % 4 == 1:  # k1, k1+
        value = diff
        grad = tl.full(diff.shape, 1.0, tl.float32)
    elif KIND == 2:
        value = diff * diff / 2
        grad = diff
    elif KIND == 4:  # abs
        value = tl.abs(diff)
        grad = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    elif KIND == 7:
        value = tl.abs(diff)
        grad = diff
    else:  # k3, k3+
        value, grad = k3_token(logp, ref, clamp)
    if KIND >= 5:  # straight-through: k2's gradient
        grad = diff
    return value, grad




@triton.jit
def k3_token(logp, ref, clamp):
    """Mirror of ``kl._kl_terms(kind="k3")``: the value and d k3 / d logp."""
    x_raw = ref - logp
    x = _clamp(x_raw, -clamp, clamp)
    ex = tl.exp(x)
    passes = ((x_raw >= -clamp) & (x_raw <= clamp)).to(tl.float32)
    return ex - x - 1.0, (1.0 - ex) * passes


@triton.jit
def _mul_kernel(g_ptr, grad_out_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    g = tl.load(g_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    go = tl.load(grad_out_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * go).to(out_ptr.dtype.element_ty), mask=keep)


ELEMENTWISE_BLOCK = 1024


@triton.jit
def _scale_kernel(g_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    g = tl.load(g_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * tl.load(scale_ptr).to(tl.float32)).to(out_ptr.dtype.element_ty), mask=keep)


def scalar_scale(g: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g * scale`` in ``dtype`` (``g`` contiguous, ``scale`` one element on ``g``'s device), in fp32."""
    out = torch.empty(g.shape, dtype=dtype, device=g.device)
    n = g.numel()
    if n:
        _scale_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](g, scale.reshape(1), out, n, BLOCK=ELEMENTWISE_BLOCK,
                                                            num_warps=NUM_WARPS)
    return out


def elementwise_grad(g: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Backward of an elementwise op whose forward stored d out / d in as ``g``: ``g * grad_out``."""
    out = torch.empty(g.shape, dtype=dtype, device=g.device)
    n = g.numel()
    if n:
        _mul_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](
            g, grad_out.contiguous(), out, n, BLOCK=ELEMENTWISE_BLOCK, num_warps=NUM_WARPS
        )
    return out
