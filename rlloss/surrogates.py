"""The per-token PPO clipped surrogate, token level (PPO/GRPO/DAPO) and sequence level (GSPO)."""

from __future__ import annotations

import torch

from ._dispatch import resolve_backend
from ._validate import (
    check_adv,
    check_choice,
    check_float,
    check_mask,
    check_number,
    check_same_device,
    check_same_shape,
    compute_dtype,
)

LEVELS = ("token", "sequence")


def prepare_inputs(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upcast and select out masked positions, so NaN/inf there never reach values or gradients.

    Returns ``logp`` (differentiable, 0 where masked), ``old_logp`` and ``adv`` broadcast to
    ``[B, T]`` (constants, 0 where masked). ``old_logp=None`` means ``sg(logp)``.
    """
    dtype = compute_dtype(logp, old_logp, adv)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    lp = torch.where(mask, logp.to(dtype), zero)
    old = lp.detach() if old_logp is None else torch.where(mask, old_logp.detach().to(dtype), zero)
    a = adv.detach().to(dtype)
    a = torch.where(mask, a[:, None] if a.dim() == 1 else a, zero)
    return lp, old, a


def log_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str, max_log_ratio: float
) -> torch.Tensor:
    """Clamped log importance ratio ``[B, T]`` (inputs already 0 where masked).

    token: ``clamp(logp - old_logp)``. sequence (GSPO): ``logp - sg(logp) + s_i`` with
    ``s_i = sg(masked_mean_t(logp - old_logp))`` (0 for an empty row): its value is the row's mean
    log-ratio, its gradient that of ``logp``.
    """
    d = logp - old_logp
    if level == "sequence":
        n = mask.sum(-1).clamp(min=1).to(d.dtype)
        s = (d.detach().sum(-1) / n)[:, None]
        d = logp - logp.detach() + s
    return torch.clamp(d, -max_log_ratio, max_log_ratio)


def ppo_token_loss(
    ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)``, then the dual clip; also the pre-dual loss."""
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    loss = -surrogate
    if dual_clip is None:
        return loss, loss
    return torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss), loss


def check_surrogate_args(
    logp: object,
    old_logp: object,
    adv: object,
    mask: object,
    *,
    eps_low: object,
    eps_high: object,
    dual_clip: object,
    level: object,
    max_log_ratio: object,
) -> tuple[torch.Tensor, float]:
    """Validate the shared PPO arguments; returns the bool mask and the resolved ``eps_high``."""
    check_float("logp", logp, ndim=2)
    if old_logp is not None:
        check_float("old_logp", old_logp)
        check_same_shape("old_logp", old_logp, "logp", logp)
    check_adv("adv", adv, "logp", logp)
    if mask is None:
        mask = torch.ones(logp.shape, dtype=torch.bool, device=logp.device)
    mask = check_mask("mask", mask, "logp", logp)
    check_same_device(logp=logp, old_logp=old_logp, adv=adv, mask=mask)
    check_number("eps_low", eps_low, low=0, high=1, high_inclusive=False)
    eps_high = eps_low if eps_high is None else check_number("eps_high", eps_high, low=0)
    if dual_clip is not None:
        check_number("dual_clip", dual_clip, low=1, low_inclusive=False)
    check_choice("level", level, LEVELS)
    check_number("max_log_ratio", max_log_ratio, low=0, low_inclusive=False)
    return mask, eps_high


def _clipped_surrogate_torch(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    level: str,
    max_log_ratio: float,
) -> torch.Tensor:
    lp, old, a = prepare_inputs(logp, old_logp, adv, mask)
    ratio = torch.exp(log_ratio(lp, old, mask, level, max_log_ratio))
    loss, _ = ppo_token_loss(ratio, a, eps_low, eps_high, dual_clip)
    return torch.where(mask, loss, torch.zeros_like(loss))


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    level: str = "token",
    max_log_ratio: float = 20.0,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Per-token PPO clipped surrogate loss (Schulman et al. 2017, arXiv 1707.06347).

    ::

        d = clamp(logp - old_logp, -max_log_ratio, max_log_ratio),   r = exp(d)
        l = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
        dual clip c > 1 (Ye et al. 2020, arXiv 1912.09729): where A < 0, l = min(l, -c * A)

    * ``eps_high=None`` means ``eps_low`` (GRPO: 0.2/0.2). DAPO's clip-higher (Yu et al. 2025,
      arXiv 2503.14476) decouples them: ``eps_low=0.2, eps_high=0.28``.
    * ``level="sequence"`` is GSPO (Zheng et al. 2025, arXiv 2507.18071): the ratio of every
      token of row ``i`` is the row's length-normalised sequence ratio,
      ``d = logp - sg(logp) + sg(masked_mean_t(logp - old_logp))``, so each token's gradient is
      scaled by the sequence ratio. GSPO's values: ``eps_low=3e-4, eps_high=4e-4``.
    * The clamp of ``d`` keeps ``exp`` finite; TRL and Liger do not clamp. The gradient is zero
      where the clamp or the clip binds, as autograd of the formula gives (``torch.minimum``
      gives each side half the gradient on an exact tie).
    * ``old_logp=None`` means ``sg(logp)`` (one update per batch): the value is ``-A`` per token
      yet the gradient is ``-A * dlogp``. A loss of 0 does not mean a gradient of 0.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (fp16, bf16,
            fp32 or fp64); the only input that receives a gradient.
        old_logp: ``[B, T]`` under the sampling policy, or None; a constant.
        adv: ``[B]`` per-sequence or ``[B, T]`` per-token advantages; a constant.
        mask: ``[B, T]`` bool (or numeric, non-zero = valid), None for all valid.
        eps_low, eps_high, dual_clip, level, max_log_ratio: as above.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``[B, T]`` per-token loss, 0 where masked, fp32 (fp64 for fp64 inputs).
    """
    mask, eps_high = check_surrogate_args(
        logp, old_logp, adv, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, level=level,
        max_log_ratio=max_log_ratio,
    )
    if resolve_backend(backend, logp, old_logp, adv, mask) == "triton":
        from .kernels.surrogate import clipped_surrogate_triton

        return clipped_surrogate_triton(logp, old_logp, adv, mask, eps_low, eps_high, dual_clip, level, max_log_ratio)
    return _clipped_surrogate_torch(logp, old_logp, adv, mask, eps_low, eps_high, dual_clip, level, max_log_ratio)
