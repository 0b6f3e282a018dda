"""``clipped_surrogate`` on the fused per-token pass of ``policy_loss``: per-token loss and gradient."""

from __future__ import annotations

import torch

from ._common import elementwise_grad
from .policy_loss import per_token_pass


class _ClippedSurrogateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, adv, mask, eps_low, eps_high, dual_clip, level, max_log_ratio):
        needs_grad = ctx.needs_input_grad[0]
        g, _, token_loss, _ = per_token_pass(
            logp, old_logp, adv, mask, None, beta=0.0, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
            level=level, max_log_ratio=max_log_ratio, write_grad=needs_grad, write_partials=False,
            write_token_loss=True,
        )
        if needs_grad:
            ctx.save_for_backward(g)
            ctx.logp_dtype = logp.dtype
        return token_loss

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return (elementwise_grad(g, grad_out, ctx.logp_dtype),) + (None,) * 8


def clipped_surrogate_triton(logp, old_logp, adv, mask, eps_low, eps_high, dual_clip, level, max_log_ratio):
    """Per-token PPO loss ``[B, T]`` fp32 on validated inputs; fp64 goes to the reference."""
    if any(t is not None and t.dtype == torch.float64 for t in (logp, old_logp, adv)):
        from rlloss.surrogates import _clipped_surrogate_torch

        return _clipped_surrogate_torch(logp, old_logp, adv, mask, eps_low, eps_high, dual_clip, level, max_log_ratio)
    old = None if old_logp is None else old_logp.detach()
    return _ClippedSurrogateFunction.apply(logp, old, adv.detach(), mask, eps_low, eps_high, dual_clip, level,
                                           max_log_ratio)
