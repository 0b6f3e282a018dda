"""Per-token objective losses on the fused per-token pass of ``policy_loss``: loss and gradient."""

from __future__ import annotations

import torch

from .policy_loss import per_token_pass


def objective_surrogate_forward(logp: torch.Tensor, old_logp: torch.Tensor | None, adv: torch.Tensor,
                                mask: torch.Tensor, *, objective: int, dual_or_low: bool, delta_or_high: bool,
                                params: list[float], row_stat: int, max_log_ratio: float,
                                needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss ``[B, T]`` fp32 of a fused objective, and d loss / d logp (empty without ``needs_grad``)."""
    g, _, token_loss, _ = per_token_pass(
        logp, old_logp, adv, mask, None, objective=objective, dual_or_low=dual_or_low, delta_or_high=delta_or_high,
        params=params, row_stat=row_stat, beta=0.0, max_log_ratio=max_log_ratio,
        write_grad=needs_grad, write_partials=False, write_token_loss=True,
    )
    return token_loss, g if g is not None else logp.new_empty(0)
