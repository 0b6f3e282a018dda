"""Pieces every rlloss kernel module shares: launch sizes, dtype rules and the per-token PPO math."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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


@triton.jit
def ppo_token(d, adv, lo, hi, dual_clip, max_log_ratio, HAS_DUAL: tl.constexpr):
    """Mirror of ``surrogates.ppo_token_loss`` on the clamped log-ratio, with its gradient.

    Returns the loss, the loss before the dual clip, d loss / d logp, and the ratio.
    """
    dc = tl.minimum(tl.maximum(d, -max_log_ratio), max_log_ratio)
    passes_clamp = ((d >= -max_log_ratio) & (d <= max_log_ratio)).to(tl.float32)
    ratio = tl.exp(dc)
    clipped = tl.minimum(tl.maximum(ratio, lo), hi)
    passes_clip = ((ratio >= lo) & (ratio <= hi)).to(tl.float32)
    unclipped_term = ratio * adv
    clipped_term = clipped * adv
    w = tie_weight(unclipped_term, clipped_term)
    loss = -tl.minimum(unclipped_term, clipped_term)
    dloss_dratio = -adv * (w + (1.0 - w) * passes_clip)
    loss_pre_dual = loss
    if HAS_DUAL:
        bound = -dual_clip * adv
        negative = adv < 0
        dloss_dratio = tl.where(negative, dloss_dratio * tie_weight(loss, bound), dloss_dratio)
        loss = tl.where(negative, tl.minimum(loss, bound), loss)
    return loss, loss_pre_dual, dloss_dratio * ratio * passes_clamp, ratio


@triton.jit
def k3_token(logp, ref, clamp):
    """Mirror of ``kl.kl_terms(kind="k3")``: the value and d k3 / d logp."""
    x_raw = ref - logp
    x = tl.minimum(tl.maximum(x_raw, -clamp), clamp)
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


def elementwise_grad(g: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Backward of an elementwise op whose forward stored d out / d in as ``g``: ``g * grad_out``."""
    out = torch.empty(g.shape, dtype=dtype, device=g.device)
    n = g.numel()
    if n:
        _mul_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](
            g, grad_out.contiguous(), out, n, BLOCK=ELEMENTWISE_BLOCK, num_warps=NUM_WARPS
        )
    return out
