"""Per-token estimators of KL(pi || pi_ref) from sampled log-probabilities."""

from __future__ import annotations

import torch

from ._constants import KL_INPUT_CLAMP, KL_KINDS
from ._dispatch import resolve_backend
from ._validate import check_choice, check_float, check_same_device, check_same_shape, compute_dtype

BASE_KINDS = ("k1", "k2", "k3", "abs")


def _kl_terms(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """The estimator on tensors already in the compute dtype (no checks, no casts)."""
    if kind.endswith("+"):  # straight-through: the base estimator's value, k2's gradient (verl)
        k2 = _kl_terms(logp, ref_logp, "k2")
        return k2 - k2.detach() + _kl_terms(logp, ref_logp, kind[:-1]).detach()
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return (logp - ref_logp) ** 2 / 2
    if kind == "abs":
        return (logp - ref_logp).abs()
    x = torch.clamp(ref_logp - logp, -KL_INPUT_CLAMP, KL_INPUT_CLAMP)
    return torch.exp(x) - x - 1


def _kl_torch(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    dtype = compute_dtype(logp, ref_logp)
    return _kl_terms(logp.to(dtype), ref_logp.detach().to(dtype), kind)


def _check_pair(logp: object, ref_logp: object) -> None:
    check_float("logp", logp)
    check_float("ref_logp", ref_logp)
    check_same_shape("ref_logp", ref_logp, "logp", logp)
    check_same_device(logp=logp, ref_logp=ref_logp)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, *, kind: str = "k3", backend: str = "auto") -> torch.Tensor:
    r"""Per-token Monte-Carlo estimate of ``KL(pi_theta || pi_ref)`` at the sampled tokens.

    With ``log q/p = ref_logp - logp`` (Schulman 2020, "Approximating KL Divergence",
    http://joschu.net/blog/kl-approx.html):

    * ``k1 = logp - ref_logp`` (unbiased, high variance, can be negative);
    * ``k2 = (logp - ref_logp)^2 / 2`` (biased, low variance; verl ``mse``);
    * ``k3 = exp(x) - x - 1`` with ``x = clamp(ref_logp - logp, -20, 20)`` (unbiased, >= 0;
      GRPO's estimator, verl ``low_var_kl``). The clamp keeps ``exp`` finite; it binds only at
      log-ratios no trainer should see, and its gradient is zero there, as autograd gives.
      (verl also clamps k3's value to +-10: not followed.)
    * ``abs = |logp - ref_logp|``;
    * ``"k1+"``, ``"k3+"``, ``"abs+"``: straight-through, the value of the base estimator with the
      gradient of k2 (``k2 - sg(k2) + sg(base)``), as verl's ``+`` kinds.

    TRL's default ``beta`` was 0.04 (GRPO); DAPO and Dr. GRPO use no KL term.

    Args:
        logp: log-probs of the sampled tokens under the policy, any shape; carries the gradient.
        ref_logp: the same under the frozen reference, same shape; treated as a constant.
        kind: ``"k1" | "k2" | "k3" | "abs" | "k1+" | "k3+" | "abs+"``.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        Per-element estimate, shape of ``logp``, fp32 (fp64 for fp64 inputs).
    """
    _check_pair(logp, ref_logp)
    check_choice("kind", kind, KL_KINDS)
    if resolve_backend(backend, logp, ref_logp) == "triton" and torch.float64 not in (logp.dtype, ref_logp.dtype):
        from ._fused import kl_estimate_triton

        return kl_estimate_triton(logp, ref_logp, kind)
    return _kl_torch(logp, ref_logp, kind)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    r"""The k3 estimator ``exp(x) - x - 1``, ``x = clamp(ref_logp - logp, -20, 20)``; ``kl_estimate(kind="k3")``.

    Used by GRPO (Shao et al. 2024, arXiv 2402.03300, eq. 4) with ``beta = 0.04``. Non-negative,
    unbiased for ``KL(pi_theta || pi_ref)`` at tokens sampled from ``pi_theta``.

    Args:
        logp: any shape, floating; carries the gradient.
        ref_logp: same shape; treated as a constant.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        Shape of ``logp``, fp32 (fp64 for fp64 inputs).
    """
    return kl_estimate(logp, ref_logp, kind="k3", backend=backend)
