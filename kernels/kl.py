"""Elementwise KL estimators (k1, k2, k3) with their gradient stored for backward."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import ELEMENTWISE_BLOCK, KL_KIND_CODES, NUM_WARPS, elementwise_grad, grad_buffer_dtype, kl_token

KL_CLAMP = 20.0  # rlloss.kl.KL_INPUT_CLAMP


@triton.jit
def _kl_kernel(logp_ptr, ref_ptr, value_ptr, grad_ptr, n, clamp,
               KIND: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Mirror of ``rlloss.kl.kl_terms``: the estimate and d estimate / d logp (``kl_token``)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    logp = tl.load(logp_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    value, grad = kl_token(logp, ref, clamp, KIND)
    tl.store(value_ptr + offs, value, mask=keep)
    if WRITE_GRAD:
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=keep)


class _KLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, kind, needs_grad):
        flat_logp, flat_ref = logp.reshape(-1), ref_logp.reshape(-1)
        n = flat_logp.numel()
        value = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
        g = torch.empty(logp.shape, dtype=grad_buffer_dtype(logp.dtype), device=logp.device) if needs_grad else value
        if n:
            _kl_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](
                flat_logp, flat_ref, value, g, n, KL_CLAMP,
                KIND=KL_KIND_CODES[kind], WRITE_GRAD=needs_grad, BLOCK=ELEMENTWISE_BLOCK, num_warps=NUM_WARPS,
            )
        if needs_grad:
            ctx.save_for_backward(g)
            ctx.logp_dtype = logp.dtype
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return elementwise_grad(g, grad_out, ctx.logp_dtype), None, None, None


def kl_estimate_triton(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """KL estimate of validated inputs (any shape), fp32; fp64 goes to the reference."""
    if torch.float64 in (logp.dtype, ref_logp.dtype):
        from rlloss.kl import _kl_torch

        return _kl_torch(logp, ref_logp, kind)
    needs_grad = torch.is_grad_enabled() and logp.requires_grad
    return _KLFunction.apply(logp, ref_logp.detach(), kind, needs_grad)
