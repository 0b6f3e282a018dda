"""``policy_loss``: the per-token surrogate, the KL penalty and the recipe's aggregation in one call."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._dispatch import resolve_backend
from ._validate import check_float, check_number, check_same_device, check_same_shape
from .aggregation import aggregate, check_aggregation, safe_div
from .kl import kl_terms
from .surrogates import check_surrogate_args, log_ratio, ppo_token_loss, prepare_inputs

METRICS = ("clip_low", "clip_high", "clip_dual", "ratio_mean", "kl_mean")


class PolicyLoss(NamedTuple):
    """The scalar loss and detached metrics; ``result[0]`` is the loss."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def token_metrics(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    loss_pre_dual: torch.Tensor,
    kl: torch.Tensor | None,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> dict[str, torch.Tensor]:
    """Masked means over the valid tokens of the call, detached (0 when no token is valid)."""
    ratio, adv, loss_pre_dual = ratio.detach(), adv.detach(), loss_pre_dual.detach()
    n = mask.sum().to(ratio.dtype)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return safe_div(torch.where(mask, x.to(ratio.dtype), torch.zeros_like(ratio)).sum(), n)

    dual = torch.zeros_like(mask) if dual_clip is None else (adv < 0) & (loss_pre_dual > -dual_clip * adv)
    metrics = {
        "clip_low": mean((ratio < 1 - eps_low) & (adv < 0)),
        "clip_high": mean((ratio > 1 + eps_high) & (adv > 0)),
        "clip_dual": mean(dual),
        "ratio_mean": mean(ratio),
    }
    if kl is not None:
        metrics["kl_mean"] = mean(kl.detach())
    return metrics


def _policy_loss_torch(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    beta: float,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    level: str,
    max_log_ratio: float,
    aggregation: str,
    max_tokens: float | None,
    num_tokens: float | torch.Tensor | None,
    num_seqs: float | torch.Tensor | None,
    dp_size: int,
) -> PolicyLoss:
    lp, old, a = prepare_inputs(logp, old_logp, adv, mask)
    ratio = torch.exp(log_ratio(lp, old, mask, level, max_log_ratio))
    loss, loss_pre_dual = ppo_token_loss(ratio, a, eps_low, eps_high, dual_clip)
    kl = None
    if ref_logp is not None:
        ref = torch.where(mask, ref_logp.detach().to(lp.dtype), torch.zeros_like(lp))
        kl = kl_terms(lp, ref, "k3")
        if beta != 0:
            loss = loss + beta * kl
    per_token = torch.where(mask, loss, torch.zeros_like(loss))
    total = aggregate(
        per_token, mask, aggregation, max_tokens=max_tokens, num_tokens=num_tokens, num_seqs=num_seqs, dp_size=dp_size
    )
    return PolicyLoss(total, token_metrics(ratio, a, loss_pre_dual, kl, mask, eps_low, eps_high, dual_clip))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    level: str = "token",
    max_log_ratio: float = 20.0,
    aggregation: str = "token_mean",
    max_tokens: float | None = None,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    dp_size: int = 1,
    backend: str = "auto",
) -> PolicyLoss:
    r"""The scalar policy-gradient loss of GRPO-family recipes, with metrics.

    Per token ``l = clipped_surrogate(...) + beta * k3_kl(logp, ref_logp)`` (see those functions),
    ``M`` the mask, then by ``aggregation``:

    ======================== ====================================== ==========================
    aggregation              loss                                   recipe
    ======================== ====================================== ==========================
    ``token_mean``           ``sum(l*M) / N_tok``                   DAPO, BNPO
    ``seq_mean_token_mean``  ``sum_i (sum_t l*M / n_i) / N_seq``    GRPO (as published)
    ``seq_mean_token_sum``   ``sum_i sum_t l*M / N_seq``
    ``constant``             ``sum(l*M) / (N_seq * max_tokens)``    Dr. GRPO
    ======================== ====================================== ==========================

    ``N_tok = num_tokens`` if given else ``mask.sum()``; ``N_seq = num_seqs`` if given else ``B``;
    ``n_i`` the valid tokens of row ``i`` (an empty row contributes 0). The loss is multiplied by
    ``dp_size``. Any zero normaliser gives a loss of 0 with zero gradient, never NaN.

    Gradient accumulation and data parallelism: pass the counts of the whole optimizer step (all
    micro-batches, all ranks) as ``num_tokens``/``num_seqs`` and the number of ranks as
    ``dp_size``; then the sum of the micro-batch losses, averaged over ranks as DDP/FSDP do, has
    exactly the gradient of the full-batch objective. The local defaults are right only for one
    micro-batch on one process: a mean of micro-batch means weights tokens unequally (GRPO's
    length bias, Liu et al. 2025, arXiv 2503.20783, is of the same kind).

    Metrics (detached masked means over the valid tokens of this call; 0 when there are none):
    ``clip_low`` (``r < 1-eps_low`` and ``A < 0``), ``clip_high`` (``r > 1+eps_high`` and
    ``A > 0``), ``clip_dual`` (the dual-clip bound binds), ``ratio_mean``, and ``kl_mean`` (k3,
    when ``ref_logp`` is given).

    Recipes (``rlloss.recipes``): GRPO ``eps 0.2/0.2, seq_mean_token_mean, beta 0.04``; DAPO
    ``0.2/0.28, token_mean, beta 0``; Dr. GRPO ``0.2/0.2, constant, beta 0``; GSPO
    ``3e-4/4e-4, level="sequence", seq_mean_token_mean``.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the policy (fp16/bf16/fp32/fp64);
            the only input that receives a gradient.
        old_logp: ``[B, T]`` under the sampling policy, or None for ``sg(logp)``.
        adv: ``[B]`` or ``[B, T]`` advantages.
        mask: ``[B, T]`` bool (or numeric, non-zero = valid).
        ref_logp: ``[B, T]`` under the frozen reference; required when ``beta != 0``.
        beta: KL coefficient (GRPO 0.04; DAPO and Dr. GRPO 0).
        eps_low, eps_high, dual_clip, level, max_log_ratio: the surrogate's options.
        aggregation, max_tokens, num_tokens, num_seqs, dp_size: the normaliser, as above.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``PolicyLoss(loss, metrics)``: a 0-d fp32 loss (fp64 for fp64 inputs) and a dict of 0-d
        detached fp32 metrics.
    """
    mask, eps_high = check_surrogate_args(
        logp, old_logp, adv, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, level=level,
        max_log_ratio=max_log_ratio,
    )
    check_number("beta", beta, low=0)
    if ref_logp is not None:
        check_float("ref_logp", ref_logp)
        check_same_shape("ref_logp", ref_logp, "logp", logp)
        check_same_device(logp=logp, ref_logp=ref_logp)
    elif beta != 0:
        raise ValueError(f"beta={beta} adds a KL penalty, which needs ref_logp; got ref_logp=None")
    max_tokens, num_tokens, num_seqs = check_aggregation(
        aggregation, max_tokens=max_tokens, num_tokens=num_tokens, num_seqs=num_seqs, dp_size=dp_size,
        device=logp.device,
    )
    args = (logp, old_logp, adv, mask, ref_logp, beta, eps_low, eps_high, dual_clip, level, max_log_ratio,
            aggregation, max_tokens, num_tokens, num_seqs, dp_size)
    if resolve_backend(backend, logp, old_logp, adv, mask, ref_logp) == "triton":
        from .kernels.policy_loss import policy_loss_triton

        return PolicyLoss(*policy_loss_triton(*args))
    return _policy_loss_torch(*args)
