"""``torch.library`` custom ops of the loss from hidden states (``rlloss::linear_*``).

The launches of ``kernels.linear_logprobs`` wrapped so ``torch.compile`` traces them as opaque ops
(see ``shared/COMPILE.md``): each op has a fake implementation with the real shapes and dtypes, and
``rlloss::linear_token_logprobs`` has a registered backward that calls ``rlloss::linear_grads``.
Kept apart from the other kernels' registrations until they are folded into one module.
"""

from __future__ import annotations

import torch

from . import linear_logprobs as k

Tensor = torch.Tensor


@torch.library.custom_op("rlloss::linear_stats", mutates_args=())
def linear_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, valid: Tensor,
                 vocab_start: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token ``(m, s, u, zt)`` over one weight shard (see ``linear_logprobs.linear_stats``)."""
    return k.linear_stats(hidden, weight, bias, ids, valid, vocab_start, temperature)


@linear_stats.register_fake
def _(hidden, weight, bias, ids, valid, vocab_start, temperature):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(4))


@torch.library.custom_op("rlloss::linear_grads", mutates_args=())
def linear_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, valid: Tensor, vocab_start: Tensor,
                 m: Tensor, log_s: Tensor, entropy: Tensor, g_logp: Tensor, g_entropy: Tensor | None,
                 temperature: float, hidden_grad_fp32: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(d hidden, d weight, d bias)``; ``d bias`` is an empty tensor without a bias; ``d hidden`` fp32
    with ``hidden_grad_fp32``."""
    dh, dw, db = k.linear_grads(hidden, weight, bias, ids, valid, vocab_start, m, log_s, entropy, g_logp,
                                g_entropy, temperature, hidden_grad_fp32)
    return dh, dw, db if db is not None else weight.new_empty(0)


@linear_grads.register_fake
def _(hidden, weight, bias, ids, valid, vocab_start, m, log_s, entropy, g_logp, g_entropy, temperature,
      hidden_grad_fp32=False):
    db = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    dh = hidden.new_empty(hidden.shape, dtype=torch.float32 if hidden_grad_fp32 else hidden.dtype)
    return dh, torch.empty_like(weight, memory_format=torch.contiguous_format), db


@torch.library.custom_op("rlloss::linear_token_logprobs", mutates_args=())
def linear_token_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, valid: Tensor,
                          temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logp, entropy, m, log_s)`` fp32 ``[N]`` of an unsharded LM head (``lse = m + log_s``); 0 where not ``valid``."""
    start = torch.zeros(1, dtype=torch.int64, device=hidden.device)
    m, s, u, zt = k.linear_stats(hidden, weight, bias, ids, valid, start, temperature)
    logp, entropy, log_s = k.finish_stats(m, s, u, zt)
    return logp, entropy, m, log_s


@linear_token_logprobs.register_fake
def _(hidden, weight, bias, ids, valid, temperature):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(4))


def _setup(ctx, inputs, output):
    hidden, weight, bias, ids, valid, temperature = inputs
    _, entropy, m, log_s = output
    ctx.save_for_backward(hidden, weight, bias, ids, valid, entropy, m, log_s)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(m, log_s)


def _backward(ctx, g_logp, g_entropy, g_m, g_log_s):
    hidden, weight, bias, ids, valid, entropy, m, log_s = ctx.saved_tensors
    if g_logp is None:
        g_logp = torch.zeros_like(m)
    start = torch.zeros(1, dtype=torch.int64, device=hidden.device)
    dh, dw, db = linear_grads(hidden, weight, bias, ids, valid, start, m, log_s, entropy, g_logp, g_entropy,
                              ctx.temperature)
    return dh, dw, db if bias is not None else None, None, None, None


linear_token_logprobs.register_autograd(_backward, setup_context=_setup)
