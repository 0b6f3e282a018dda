"""``policy_loss``: the per-token surrogate, the KL penalty and the recipe's aggregation in one call."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from ._dispatch import resolve_backend
from ._constants import POSITIVE_LOGP_TOL
from ._validate import (
    check_choice,
    check_float,
    check_number,
    check_same_device,
    check_same_shape,
    warn_if_empty,
    warn_if_suspicious,
)
from .aggregation import _aggregate, _as_count, _check_aggregation, _safe_div
from .kl import KL_KINDS, _kl_terms
from .objectives import GMPO, PPO, Objective, _resolve_objective
from .surrogates import _check_surrogate_args, _prepare_inputs

EMPTY_CALL = ("policy_loss: no valid token in this call (mask is all False: did a filter such as DAPO's overlong "
              "filter or dynamic sampling drop every response?); the loss is 0 and nothing is trained on")
EMPTY_STEP = ("policy_loss: num_tokens=0, no valid token in the whole step (mask all False everywhere: did a filter "
              "drop every response?); the loss is 0 and nothing is trained on")

# the flat PPO arguments' defaults are the PPO dataclass's (one source)
PPO_DEFAULTS = {field.name: field.default for field in dataclasses.fields(PPO)}


class PolicyLoss(NamedTuple):
    """The scalar loss and detached metrics; ``result[0]`` is the loss."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _masked_metric(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached mean of ``x`` over the valid tokens of the call (0 when there are none)."""
    x = x.detach()
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    kept = torch.where(mask, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))
    return _safe_div(kept.sum(), mask.sum().to(dtype))


def _suspicious_counts(logp: torch.Tensor, old_logp: torch.Tensor | None, adv: torch.Tensor, mask: torch.Tensor,
                       ref_logp: torch.Tensor | None,
                       token_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 counts of the valid positions where an input is NaN or inf, and where a log-prob is above 0.

    Each input is read as given at the position (a row's ``[B]`` value at each of its tokens); "above
    0" means above ``POSITIVE_LOGP_TOL`` (2^-10), clear of fp32 rounding in a correct log-softmax.
    """
    logps = [x.detach() for x in (logp, old_logp, ref_logp) if x is not None]
    others = [x.detach() for x in (adv, token_weights) if x is not None]
    nonfinite = torch.zeros_like(mask)
    positive = torch.zeros_like(mask)
    for x in logps + others:
        nonfinite = nonfinite | ~torch.isfinite(x if x.dim() == 2 else x[:, None])
    for x in logps:
        positive = positive | (x > POSITIVE_LOGP_TOL)
    return (nonfinite & mask).sum(dtype=torch.float32), (positive & mask).sum(dtype=torch.float32)


def _bias_correction_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, objective: Objective,
                           max_log_ratio: float) -> torch.Tensor:
    """The ratio the KL term is multiplied by with ``kl_bias_correction`` (not detached).

    Token level ``exp(dc)``; at ``level="sequence"`` the row's ``exp(clamp(sum_t m*d / max(n_i, 1)))``,
    the gradient flowing through the row mean (TRL ``use_bias_correction_kl``, DeepSeek-V3.2).
    """
    d = logp - old_logp
    if getattr(objective, "level", "token") == "sequence":
        n = mask.sum(-1, keepdim=True).clamp(min=1).to(d.dtype)
        d = (torch.where(mask, d, torch.zeros_like(d)).sum(-1, keepdim=True) / n).expand_as(d)
    return torch.exp(torch.clamp(d, -max_log_ratio, max_log_ratio))


def _gmpo_loss_torch(objective: GMPO, lp, old, a, mask, kl, beta, weights, max_log_ratio, num_seqs, dp_size):
    """GMPO: ``sum_i (w_i * l_i + sum_t m*beta*kl / n_i) / N_seq``."""
    row, rho = objective.row_loss(lp, old, a, mask, max_log_ratio)
    if weights is not None:
        if weights.dim() == 1:
            row = row * weights
        else:  # verl: the geometric mean of the token weights of the row
            n = mask.sum(-1).clamp(min=1).to(lp.dtype)
            logw = torch.where(mask, torch.log(weights + 1e-10), torch.zeros_like(weights)).sum(-1) / n
            row = row * torch.exp(logw)
    per_token_kl = torch.zeros_like(lp) if kl is None or beta == 0 else beta * kl
    per_token = torch.where(mask, per_token_kl, torch.zeros_like(lp))
    kl_rows = _safe_div(per_token.sum(-1), mask.sum(-1).to(lp.dtype))
    n_seq = _as_count(lp.shape[0] if num_seqs is None else num_seqs, lp)
    return _safe_div((row + kl_rows).sum(), n_seq) * dp_size, rho[:, None].expand_as(lp)


def _policy_loss_torch(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    objective: Objective,
    ref_logp: torch.Tensor | None,
    beta: float,
    kl: str,
    kl_bias_correction: bool,
    token_weights: torch.Tensor | None,
    max_log_ratio: float,
    aggregation: str,
    max_tokens: float | None,
    num_tokens: float | torch.Tensor | None,
    num_seqs: float | torch.Tensor | None,
    dp_size: int,
) -> PolicyLoss:
    nonfinite, positive = _suspicious_counts(logp, old_logp, adv, mask, ref_logp, token_weights)
    lp, old, a = _prepare_inputs(logp, old_logp, adv, mask)
    zero = torch.zeros_like(lp)
    weights = None
    if token_weights is not None:
        w = token_weights.detach().to(lp.dtype)
        weights = w if w.dim() == 1 and objective.per_row else torch.where(mask, w[:, None] if w.dim() == 1 else w, zero)
    kl_value = None
    if ref_logp is not None:
        ref = torch.where(mask, ref_logp.detach().to(lp.dtype), zero)
        kl_value = _kl_terms(lp, ref, kl)
        if kl_bias_correction:
            kl_value = kl_value * _bias_correction_ratio(lp, old, mask, objective, max_log_ratio)
    metrics: dict[str, torch.Tensor] = {}
    if isinstance(objective, GMPO):
        total, ratio = _gmpo_loss_torch(objective, lp, old, a, mask, kl_value, beta, weights, max_log_ratio,
                                        num_seqs, dp_size)
    else:
        loss, ratio, flags = objective.token_loss(lp, old, a, mask, max_log_ratio)
        metrics.update({name: _masked_metric(flag, mask) for name, flag in flags.items()})
        if weights is not None:
            loss = loss * weights
        if kl_value is not None and beta != 0:
            loss = loss + beta * kl_value
        per_token = torch.where(mask, loss, zero)
        total = _aggregate(per_token, mask, aggregation, max_tokens=max_tokens, num_tokens=num_tokens,
                           num_seqs=num_seqs, dp_size=dp_size)
    metrics["ratio_mean"] = _masked_metric(ratio, mask)
    if kl_value is not None:
        metrics["kl_mean"] = _masked_metric(kl_value, mask)
    metrics["num_tokens"] = mask.sum(dtype=torch.float32)
    metrics["nonfinite_inputs"], metrics["positive_logp"] = nonfinite, positive
    return PolicyLoss(total, metrics)


def _resolve_policy_objective(objective: object, flat: dict[str, object]) -> Objective:
    """``objective=None``: PPO from the flat arguments; otherwise the flat ones must be left alone."""
    if objective is None:
        return PPO(**flat)  # type: ignore[arg-type]
    changed = [name for name, value in flat.items() if value != PPO_DEFAULTS[name]]
    if changed:
        raise TypeError(f"{changed[0]}={flat[changed[0]]!r} is a PPO argument; with objective={objective!r} "
                        f"set it on the objective (rlloss.PPO({changed[0]}=...)) instead")
    return _resolve_objective(objective)


def _check_token_weights(token_weights: object, logp: torch.Tensor) -> torch.Tensor | None:
    if token_weights is None:
        return None
    w = check_float("token_weights", token_weights)
    B, T = logp.shape
    if w.shape not in (torch.Size([B]), torch.Size([B, T])):
        raise ValueError(f"token_weights must be [B]={[B]} or [B, T]={[B, T]}, got {list(w.shape)}")
    if w.requires_grad:
        raise ValueError("token_weights must be detached (importance weights and keep-masks are constants); "
                         "pass token_weights.detach()")
    check_same_device(logp=logp, token_weights=w)
    return w


def _check_policy_loss_args(logp, old_logp, adv, mask, objective, ref_logp, beta, kl, kl_bias_correction, token_weights,
                            eps_low, eps_high, dual_clip, delta, level, max_log_ratio, aggregation, max_tokens,
                            num_tokens, num_seqs, dp_size) -> tuple:
    """Validate ``policy_loss``'s arguments once: the reference's and the kernels' argument tuple
    ``(logp, old_logp, adv, mask (bool), objective, ref_logp, beta, kl, kl_bias_correction,
    token_weights, max_log_ratio, aggregation, max_tokens, num_tokens, num_seqs, dp_size)``."""
    mask, _ = _check_surrogate_args(
        logp, old_logp, adv, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, level=level,
        max_log_ratio=max_log_ratio,
    )
    obj = _resolve_policy_objective(objective, {"eps_low": eps_low, "eps_high": eps_high, "dual_clip": dual_clip,
                                                "delta": delta, "level": level})
    check_number("beta", beta, low=0)
    check_choice("kl", kl, KL_KINDS)
    if not isinstance(kl_bias_correction, bool):
        raise TypeError(f"kl_bias_correction must be a bool, got {kl_bias_correction!r}")
    token_weights = _check_token_weights(token_weights, logp)
    if ref_logp is not None:
        check_float("ref_logp", ref_logp)
        check_same_shape("ref_logp", ref_logp, "logp", logp)
        check_same_device(logp=logp, ref_logp=ref_logp)
    elif beta != 0:
        raise ValueError(f"beta={beta} adds a KL penalty, which needs ref_logp; got ref_logp=None")
    max_tokens, num_tokens, num_seqs = _check_aggregation(
        aggregation, max_tokens=max_tokens, num_tokens=num_tokens, num_seqs=num_seqs, dp_size=dp_size,
        device=logp.device,
    )
    if obj.per_row and aggregation != "seq_mean_token_mean":
        raise ValueError(f'objective {obj.name} is per sequence and takes only aggregation="seq_mean_token_mean", '
                         f"got aggregation={aggregation!r}")
    args = (logp, old_logp, adv, mask, obj, ref_logp, beta, kl, kl_bias_correction, token_weights, max_log_ratio,
            aggregation, max_tokens, num_tokens, num_seqs, dp_size)
    return args


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    objective: Objective | str | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl: str = "k3",
    kl_bias_correction: bool = False,
    token_weights: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    delta: float | None = None,
    level: str = "token",
    max_log_ratio: float = 20.0,
    aggregation: str = "token_mean",
    max_tokens: float | None = None,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    dp_size: int = 1,
    backend: str = "auto",
) -> PolicyLoss:
    r"""The scalar policy-gradient loss of GRPO-family recipes and their relatives, with metrics.

    Per token ``l = w * surrogate + beta * KL``: ``surrogate`` is the objective's per-token loss
    (PPO's clip by default, built from the flat arguments ``eps_low``, ``eps_high``,
    ``dual_clip``, ``delta``, ``level``; or ``objective=`` an object of ``rlloss.objectives`` or
    its name: ``"ppo"``, ``"cispo"``, ``"sapo"``, ``"reinforce"``, ``"dppo_tv"``, ``"dppo_kl"``,
    ``"vespo"``, ``"gmpo"``, ``"kl_cov"``, ``"clip_cov"``; DRO has no defaults, pass
    ``rlloss.DRO(beta=...)``), ``w`` the ``token_weights`` (importance weights, keep-masks; never
    the normaliser), ``KL = kl_estimate(logp, ref_logp, kind=kl)``, times the ratio ``exp(dc)``
    with ``kl_bias_correction`` (not detached; DeepSeek-V3.2). ``M`` the mask, then by ``aggregation``:

    | aggregation             | loss                                  | recipe              |
    |-------------------------|---------------------------------------|---------------------|
    | ``token_mean``          | ``sum(l*M) / N_tok``                  | DAPO, BNPO          |
    | ``seq_mean_token_mean`` | ``sum_i (sum_t l*M / n_i) / N_seq``   | GRPO (as published) |
    | ``seq_mean_token_sum``  | ``sum_i sum_t l*M / N_seq``           | LUSPO               |
    | ``constant``            | ``sum(l*M) / (N_seq * max_tokens)``   | Dr. GRPO            |
    | ``token_sum``           | ``sum(l*M)``                          | verl ``token-sum``  |

    ``N_tok = num_tokens`` if given else ``mask.sum()``; ``N_seq = num_seqs`` if given else ``B``
    (TRL; verl's seq-mean modes count non-empty rows: pass ``num_seqs`` to reproduce it); ``n_i``
    the valid tokens of row ``i`` (an empty row contributes 0). The loss is multiplied by
    ``dp_size``. Any zero normaliser gives a loss of 0 with zero gradient, never NaN (verl
    divides 0 by 0 when rejection empties a micro-batch). GMPO is per row and takes only
    ``seq_mean_token_mean``.

    Gradient accumulation and data parallelism: pass the counts of the whole optimizer step (all
    micro-batches, all ranks; ``rlloss.distributed.step_counts``) as ``num_tokens``/``num_seqs`` and
    the number of ranks as ``dp_size``; then the sum of the micro-batch losses, averaged over ranks
    as DDP/FSDP do, has exactly the gradient of the full-batch objective, for every objective that
    is a sum over tokens or rows (GMPO included, with ``num_seqs``); not for KL-Cov/Clip-Cov, whose
    token selection spans the call. The local defaults are right only for one micro-batch on one
    process.

    Metrics (detached masked means over the valid tokens of this call; 0 when there are none):
    ``ratio_mean``; ``kl_mean`` when ``ref_logp`` is given; PPO: ``clip_low`` (``r < 1-eps_low``
    and ``A < 0``), ``clip_high`` (``r > 1+eps_high`` and ``A > 0``), ``clip_dual``; CISPO: the
    fractions whose weight hit ``low``/``high``; DPPO: ``outside_region``; KL-Cov/Clip-Cov:
    ``cov_selected``. And ``num_tokens``: the valid tokens of this call, ``mask.sum()`` (not the
    ``num_tokens`` argument), as fp32 (exact up to 2^24 tokens).

    Inputs a loss should not see are counted, not changed (fp32 counts over the valid positions of
    this call): ``nonfinite_inputs``, where any of ``logp``, ``old_logp``, ``ref_logp``, ``adv``
    (per token, or its row's) or ``token_weights`` is NaN or inf (a NaN there makes the loss NaN);
    ``positive_logp``, where ``logp``, ``old_logp`` or ``ref_logp`` is above ``2**-10`` (a
    log-probability is ``<= 0``; the margin is far above fp32 rounding, far below a real error, such
    as logits passed as log-probs). Masked positions are never read. Where the counts are on the
    host (the reference on CPU tensors, not under ``torch.compile``) a non-zero count also issues an
    ``rlloss.SuspiciousInputWarning``; the fused kernels count them in the same pass, with no sync.

    Empty batches: when nothing is trained on, the loss is 0 with zero gradient and every metric
    0, which looks like a quiet step; so an ``rlloss.EmptyBatchWarning`` is issued (through
    ``warnings``: shown once per call site by Python's default filter) when the count is 0: the
    ``num_tokens`` argument when given (the step's count), else this call's valid tokens. It is
    checked only where the count is already on the host: a Python number, or the reference on CPU
    tensors. On CUDA the count is never read back (a device sync), and not under
    ``torch.compile``: watch ``metrics["num_tokens"]``, or the step's total from
    ``rlloss.distributed.step_counts``.

    Recipes (``rlloss.recipes``): GRPO ``eps 0.2/0.2, seq_mean_token_mean, beta 0.04``; DAPO
    ``0.2/0.28, token_mean, beta 0``; Dr. GRPO ``0.2/0.2, constant, beta 0``; GSPO
    ``3e-4/4e-4, level="sequence", seq_mean_token_mean``; CISPO, SAPO, LUSPO, GMPO, DPPO.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the policy (fp16/bf16/fp32/fp64);
            the only input that receives a gradient.
        old_logp: ``[B, T]`` under the sampling policy, or None for ``sg(logp)``.
        adv: ``[B]`` or ``[B, T]`` advantages.
        mask: ``[B, T]`` bool (or numeric, non-zero = valid).
        objective: None (PPO from the flat arguments), an objective object, or its name.
        ref_logp: ``[B, T]`` under the frozen reference; required when ``beta != 0``.
        beta: KL coefficient (GRPO 0.04; DAPO and Dr. GRPO 0).
        kl: the KL estimator (``kl_estimate``'s kinds), default ``"k3"``.
        kl_bias_correction: multiply the KL term by the importance ratio.
        token_weights: ``[B, T]`` or ``[B]``, detached; multiplies the surrogate term only.
        eps_low, eps_high, dual_clip, delta, level: PPO's options (``objective=None`` only).
        max_log_ratio: the clamp of ``logp - old_logp`` (every objective).
        aggregation, max_tokens, num_tokens, num_seqs, dp_size: the normaliser, as above.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``PolicyLoss(loss, metrics)``: a 0-d fp32 loss (fp64 for fp64 inputs) and a dict of 0-d
        detached fp32 metrics.
    """
    args = _check_policy_loss_args(logp, old_logp, adv, mask, objective, ref_logp, beta, kl, kl_bias_correction,
                                   token_weights, eps_low, eps_high, dual_clip, delta, level, max_log_ratio,
                                   aggregation, max_tokens, num_tokens, num_seqs, dp_size)
    obj, mask = args[4], args[3]
    chosen = resolve_backend(backend, logp, old_logp, adv, mask, ref_logp)
    if chosen == "triton":
        from ._fused import fused_dtype, fused_support, policy_loss_triton

        reason = fused_support(obj, kl_bias_correction)
        # fp64 (gradcheck) goes to the reference: the kernels accumulate in fp32 by design
        if reason is None and fused_dtype(logp, old_logp, adv, ref_logp, token_weights):
            # the fused path never reads its count back (CUDA; under the interpreter too, so that its
            # counted syncs are CUDA's): only a count given as a number can warn here
            if not isinstance(num_tokens, torch.Tensor):
                warn_if_empty(num_tokens, EMPTY_STEP)
            return PolicyLoss(*policy_loss_triton(*args))
        if reason is not None and backend == "triton":
            raise ValueError(f'backend="triton" does not run {reason}; use backend="auto" (the reference) or "torch"')
    out = _policy_loss_torch(*args)
    warn_if_suspicious(out.metrics["nonfinite_inputs"], out.metrics["positive_logp"], "policy_loss")
    if num_tokens is None:
        warn_if_empty(out.metrics["num_tokens"], EMPTY_CALL)
    else:
        warn_if_empty(num_tokens, EMPTY_STEP)
    return out
