"""Per-token objective losses on the fused per-token pass of ``policy_loss``: loss and gradient."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._common import elementwise_grad
from .policy_loss import per_token_pass


class _SurrogateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, adv, mask, needs_grad, objective, max_log_ratio):
        g, _, token_loss, _ = per_token_pass(
            logp, old_logp, adv, mask, None, objective=objective, beta=0.0, max_log_ratio=max_log_ratio,
            write_grad=needs_grad, write_partials=False, write_token_loss=True,
        )
        if needs_grad:
            ctx.save_for_backward(g)
            ctx.logp_dtype = logp.dtype
        return token_loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return (elementwise_grad(g, grad_out, ctx.logp_dtype),) + (None,) * 6


def objective_surrogate_triton(objective, logp, old_logp, adv, mask, max_log_ratio):
    """Per-token loss ``[B, T]`` fp32 of a fused objective on validated inputs; fp64 goes to the reference."""
    if any(t is not None and t.dtype == torch.float64 for t in (logp, old_logp, adv)):
        from rlloss.surrogates import objective_surrogate_torch

        return objective_surrogate_torch(objective, logp, old_logp, adv, mask, max_log_ratio)
    old = None if old_logp is None else old_logp.detach()
    needs_grad = torch.is_grad_enabled() and logp.requires_grad
    return _SurrogateFunction.apply(logp, old, adv.detach(), mask, needs_grad, objective, max_log_ratio)
