"""Elementwise KL estimators (k1, k2, k3) with their gradient stored for backward."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlloss._constants import KL_INPUT_CLAMP

from ._common import ELEMENTWISE_BLOCK, NUM_WARPS, grad_buffer_dtype, kl_token


@triton.jit
def _kl_kernel(logp_ptr, ref_ptr, value_ptr, grad_ptr, n, clamp,
               KIND: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Mirror of ``rlloss.kl._kl_terms``: the estimate and d estimate / d logp (``kl_token``)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    logp = tl.load(logp_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    value, grad = kl_token(logp, ref, clamp, KIND)
    tl.store(value_ptr + offs, value, mask=keep)
    if WRITE_GRAD:
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=keep)


def kl_forward(logp: torch.Tensor, ref_logp: torch.Tensor, kind: int,
               needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimate (fp32, any shape) and d estimate / d logp (empty without ``needs_grad``)."""
    flat_logp, flat_ref = logp.reshape(-1), ref_logp.reshape(-1)
    n = flat_logp.numel()
    value = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    shape = logp.shape if needs_grad else (0,)
    g = torch.empty(shape, dtype=grad_buffer_dtype(logp.dtype), device=logp.device)
    if n:
        _kl_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](
            flat_logp, flat_ref, value, g if needs_grad else value, n, KL_INPUT_CLAMP,
            KIND=kind, WRITE_GRAD=needs_grad, BLOCK=ELEMENTWISE_BLOCK, num_warps=NUM_WARPS,
        )
    return value, g
