"""TRL's GRPO loss arithmetic written inline in plain PyTorch: the eager baseline of the benchmarks.

This is the per-token computation of TRL's ``GRPOTrainer`` loss, written here from its formulas
(not copied), for ``loss_type`` ``"grpo"``, ``"dapo"`` and ``"dr_grpo"`` and both importance
sampling levels (``"token"``; ``"sequence"`` is GSPO)::

    log_ratio  = logp - old_logp                       (old_logp=None: logp.detach())
    token:     log_w = log_ratio                                           [B, T]
    sequence:  log_w = (sum_t log_ratio * M / max(sum_t M, 1))[:, None]    [B, 1]
    coef_1 = exp(log_w),  coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high)
    l = -min(coef_1 * A[:, None], coef_2 * A[:, None])
    l = l + beta * (exp(ref - logp) - (ref - logp) - 1)                    (when beta != 0)
    grpo:    mean_i( sum_t l*M / max(sum_t M, 1) )
    dapo:    sum(l*M) / max(sum(M), 1)
    dr_grpo: sum(l*M) / (B * max_completion_length)

Arithmetic runs in the inputs' dtype, as eager code written this way does (no upcast, no clamp of
the log-ratio, masked positions multiplied by the mask rather than selected out). Only the loss is
computed: TRL's logged clip fractions and mean KL are not part of it.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
LEVELS = ("token", "sequence")


def trl_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    level: str = "token",
) -> torch.Tensor:
    """The scalar loss of TRL's GRPO trainer for ``[B, T]`` log-probs, ``[B]`` advantages and a ``[B, T]`` mask."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {list(LEVELS)}, got {level!r}")
    if beta != 0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError('loss_type="dr_grpo" needs max_completion_length')
    eps_high = eps_low if eps_high is None else eps_high
    old = logp.detach() if old_logp is None else old_logp

    log_ratio = logp - old
    if level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    if beta != 0:
        x = ref_logp - logp
        per_token_loss = per_token_loss + beta * (torch.exp(x) - x - 1)

    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dapo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
