"""The per-token PPO clipped surrogate, token level (PPO/GRPO/DAPO) and sequence level (GSPO)."""

from __future__ import annotations

import torch

from ._dispatch import resolve_backend
from .objectives import CISPO, DPPO, DRO, GMPO, PPO, SAPO, VESPO, ClipCov, KLCov, Objective, Reinforce
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


def _prepare_inputs(
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


def _check_surrogate_args(
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
    # exp(80) = 5.5e34 is finite in fp32 (exp(88.8) is not): beyond, 0 * inf would make NaN
    check_number("max_log_ratio", max_log_ratio, low=0, low_inclusive=False, high=80.0)
    return mask, eps_high


def _objective_surrogate_torch(objective: Objective, logp: torch.Tensor, old_logp: torch.Tensor | None,
                               adv: torch.Tensor, mask: torch.Tensor, max_log_ratio: float) -> torch.Tensor:
    """The objective's per-token loss, 0 where masked (per row ``[B]`` for GMPO)."""
    lp, old, a = _prepare_inputs(logp, old_logp, adv, mask)
    if isinstance(objective, GMPO):
        return objective.row_loss(lp, old, a, mask, max_log_ratio)[0]
    loss, _, _ = objective.token_loss(lp, old, a, mask, max_log_ratio)
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
    delta: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Per-token PPO clipped surrogate loss (Schulman et al. 2017, arXiv 1707.06347).

    ::

        d = clamp(logp - old_logp, -max_log_ratio, max_log_ratio),   r = exp(d)
        l = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
        dual clip c > 1 (Ye et al. 2020, arXiv 1912.09729): if A < 0, l = min(l, -c*A)
        delta (INTELLECT-2, arXiv 2505.07291): the unclipped branch uses min(r, delta)

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
    mask, eps_high = _check_surrogate_args(
        logp, old_logp, adv, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, level=level,
        max_log_ratio=max_log_ratio,
    )
    objective = PPO(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, delta=delta, level=level)
    return _dispatch_surrogate(objective, logp, old_logp, adv, mask, max_log_ratio, backend)


def _dispatch_surrogate(objective: Objective, logp, old_logp, adv, mask, max_log_ratio, backend) -> torch.Tensor:
    if resolve_backend(backend, logp, old_logp, adv, mask) == "triton":
        from ._fused import fused_dtype, fused_support, objective_surrogate_triton

        reason = fused_support(objective, False, per_token=True)
        if reason is None and not fused_dtype(logp, old_logp, adv):
            return _objective_surrogate_torch(objective, logp, old_logp, adv, mask, max_log_ratio)
        if reason is None:
            return objective_surrogate_triton(objective, logp, old_logp, adv, mask, max_log_ratio)
        if backend == "triton":
            raise ValueError(f'backend="triton" does not run {reason}; use backend="auto" (the reference) or "torch"')
    return _objective_surrogate_torch(objective, logp, old_logp, adv, mask, max_log_ratio)


def _checked(logp, old_logp, adv, mask, max_log_ratio) -> torch.Tensor:
    mask, _ = _check_surrogate_args(logp, old_logp, adv, mask, eps_low=0.2, eps_high=None, dual_clip=None,
                                    level="token", max_log_ratio=max_log_ratio)
    return mask


def cispo_surrogate(logp, old_logp, adv, mask=None, *, low: float | None = None, high: float | None = 5.0,
                    max_log_ratio: float = 20.0, backend: str = "auto") -> torch.Tensor:
    """Per-token CISPO loss ``-sg(clamp(r, low, high)) * A * logp`` (see ``rlloss.CISPO``), 0 where masked."""
    objective = CISPO(low=low, high=high)
    return _dispatch_surrogate(objective, logp, old_logp, adv, _checked(logp, old_logp, adv, mask, max_log_ratio),
                               max_log_ratio, backend)


def sapo_surrogate(logp, old_logp, adv, mask=None, *, tau_pos: float = 1.0, tau_neg: float = 1.05,
                   max_log_ratio: float = 20.0, backend: str = "auto") -> torch.Tensor:
    """Per-token SAPO loss ``-A * (4/tau) * sigmoid(tau * (r - 1))`` (see ``rlloss.SAPO``), 0 where masked."""
    objective = SAPO(tau_pos=tau_pos, tau_neg=tau_neg)
    return _dispatch_surrogate(objective, logp, old_logp, adv, _checked(logp, old_logp, adv, mask, max_log_ratio),
                               max_log_ratio, backend)


def reinforce_surrogate(logp, old_logp, adv, mask=None, *, max_log_ratio: float = 20.0,
                        backend: str = "auto") -> torch.Tensor:
    """Per-token REINFORCE loss ``-A * logp`` (see ``rlloss.Reinforce``), 0 where masked."""
    return _dispatch_surrogate(Reinforce(), logp, old_logp, adv, _checked(logp, old_logp, adv, mask, max_log_ratio),
                               max_log_ratio, backend)


def dppo_surrogate(logp, old_logp, adv, mask=None, *, divergence: str = "tv", low: float = 0.2, high: float = 0.2,
                   weight_cap: float = 3.0, max_log_ratio: float = 20.0, backend: str = "auto") -> torch.Tensor:
    """Per-token DPPO loss ``-A * w * sg(ok) * logp`` (see ``rlloss.DPPO``), 0 where masked."""
    objective = DPPO(divergence=divergence, low=low, high=high, weight_cap=weight_cap)
    return _dispatch_surrogate(objective, logp, old_logp, adv, _checked(logp, old_logp, adv, mask, max_log_ratio),
                               max_log_ratio, backend)


def dro_surrogate(logp, old_logp, adv, mask=None, *, beta: float, max_log_ratio: float = 20.0,
                  backend: str = "auto") -> torch.Tensor:
    """Per-token DRO loss ``-(A * logp - beta/2 * d^2)`` (see ``rlloss.DRO``), 0 where masked."""
    return _dispatch_surrogate(DRO(beta=beta), logp, old_logp, adv,
                               _checked(logp, old_logp, adv, mask, max_log_ratio), max_log_ratio, backend)


def vespo_surrogate(logp, old_logp, adv, mask=None, *, k_pos: float = 2.0, lam_pos: float = 3.0, k_neg: float = 3.0,
                    lam_neg: float = 2.0, max_log_ratio: float = 20.0, backend: str = "auto") -> torch.Tensor:
    """Per-token VESPO loss ``-sg(phi) * A * logp`` (see ``rlloss.VESPO``), 0 where masked."""
    objective = VESPO(k_pos=k_pos, lam_pos=lam_pos, k_neg=k_neg, lam_neg=lam_neg)
    return _dispatch_surrogate(objective, logp, old_logp, adv, _checked(logp, old_logp, adv, mask, max_log_ratio),
                               max_log_ratio, backend)


def gmpo_surrogate(logp, old_logp, adv, mask=None, *, log_clip_low: float = 0.4, log_clip_high: float = 0.4,
                   max_log_ratio: float = 20.0, backend: str = "auto") -> torch.Tensor:
    """Per-row GMPO loss ``-Abar_i * rho_i`` ``[B]`` (see ``rlloss.GMPO``), 0 for an empty row."""
    objective = GMPO(log_clip_low=log_clip_low, log_clip_high=log_clip_high)
    return _dispatch_surrogate(objective, logp, old_logp, adv, _checked(logp, old_logp, adv, mask, max_log_ratio),
                               max_log_ratio, backend)


def kl_cov_surrogate(logp, old_logp, adv, mask=None, *, ratio: float = 2e-4, coef: float = 0.1,
                     max_log_ratio: float = 20.0, backend: str = "auto") -> torch.Tensor:
    """Per-token KL-Cov loss (see ``rlloss.KLCov``), 0 where masked. Reference only."""
    objective = KLCov(ratio=ratio, coef=coef)
    return _dispatch_surrogate(objective, logp, old_logp, adv, _checked(logp, old_logp, adv, mask, max_log_ratio),
                               max_log_ratio, backend)


def clip_cov_surrogate(logp, old_logp, adv, mask=None, *, ratio: float = 2e-4, cov_low: float = 1.0,
                       cov_high: float = 5.0, eps_low: float = 0.2, eps_high: float | None = None, seed: int = 0,
                       max_log_ratio: float = 20.0, backend: str = "auto") -> torch.Tensor:
    """Per-token Clip-Cov loss (see ``rlloss.ClipCov``), 0 where masked. Reference only."""
    objective = ClipCov(ratio=ratio, cov_low=cov_low, cov_high=cov_high, eps_low=eps_low, eps_high=eps_high, seed=seed)
    return _dispatch_surrogate(objective, logp, old_logp, adv, _checked(logp, old_logp, adv, mask, max_log_ratio),
                               max_log_ratio, backend)
