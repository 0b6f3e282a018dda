r"""Off-policy corrections and masks for training on an inference engine's samples.

A fast inference engine (vLLM, SGLang) samples the rollouts, and its log-probabilities of the
sampled tokens (``sampling_logp``) differ from the trainer's (``old_logp``, recomputed by the
training model before the update): other kernels, other precision, sometimes a stale policy.
Trainers correct for it with the helpers below. Each is a pure function of detached tensors
whose output goes to ``policy_loss`` through ``token_weights`` (weights) or ``mask`` (keep-masks):

* ``importance_weights``: truncated or masked importance sampling (TIS, MIS, IcePop), per token
  or per sequence, as TRL's ``vllm_importance_sampling_mode`` and verl's ``rollout_is``;
* ``rejection_mask``: rejection of tokens or sequences whose divergence estimate drifted too far
  (verl's ``rollout_rs``);
* ``off_policy_mask``: DeepSeek-V3.2's off-policy sequence masking (TRL
  ``off_policy_mask_threshold``);
* ``top_entropy_mask``: training only on the highest-entropy tokens (TRL
  ``top_entropy_quantile``; Wang et al. 2025, "Beyond the 80/20 Rule", arXiv 2506.01939).
  ``rlloss.distributed.top_entropy_mask`` takes the quantile over all ranks.

All outputs are detached and computed in fp32 (fp64 for fp64 inputs). Masked positions are
selected out, never multiplied by 0: NaN or inf there never reaches a result. Each public
function checks its arguments, then calls a ``_<name>_torch`` function made of tensor
operations only (no data-dependent Python control flow, no host synchronisation), which
``torch.compile(fullgraph=True)`` traces whole (``tests/test_corrections.py`` checks it).
"""

from __future__ import annotations

import math

import torch

from ._validate import check_choice, check_float, check_mask, check_number, check_same_device, check_same_shape
from ._validate import compute_dtype

__all__ = ["importance_weights", "off_policy_mask", "rejection_mask", "top_entropy_mask"]

IS_LEVELS = ("token", "sequence")
IS_MODES = ("truncate", "mask")
RS_KINDS = ("k1", "k2", "k3")
RS_LEVELS = ("token", "seq_sum", "seq_mean", "seq_max")
LOG_RATIO_BOUND = 20.0  # verl's SAFETY_BOUND: exp(±20) keeps every weight finite in fp32


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _check_bounds(low: object, high: object) -> None:
    """``low`` and ``high``: None or numbers with ``low >= 0``, ``high > 0`` and ``low <= high``."""
    check_number("low", low, low=0, allow_none=True)
    check_number("high", high, low=0, low_inclusive=False, allow_none=True)
    if low is not None and high is not None and low > high:
        raise ValueError(f"low must be <= high, got low={low!r} > high={high!r}")


# ---------------------------------------------------------------------------------------------
# importance_weights


def _importance_weights_torch(
    old_logp: torch.Tensor,
    sampling_logp: torch.Tensor,
    mask: torch.Tensor,
    level: str,
    mode: str,
    low: float | None,
    high: float | None,
    normalize: bool,
) -> torch.Tensor:
    dtype = compute_dtype(old_logp, sampling_logp)
    zero = torch.zeros((), dtype=dtype, device=old_logp.device)
    d = old_logp.detach().to(dtype) - sampling_logp.detach().to(dtype)
    x = torch.where(mask & ~torch.isnan(d), d, zero)  # NaN counts as 0 (TRL); masked positions out
    if level == "sequence":
        x = x.sum(-1, keepdim=True)
    w = torch.exp(x.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    if mode == "truncate":
        if low is not None or high is not None:
            w = w.clamp(low, high)
    else:  # mask (IcePop): zero outside [low, high], bounds inclusive
        keep = torch.ones_like(w, dtype=torch.bool)
        if low is not None:
            keep = keep & (w >= low)
        if high is not None:
            keep = keep & (w <= high)
        w = torch.where(keep, w, zero)
    if normalize:
        if level == "token":
            total = torch.where(mask, w, zero).sum()
            count = mask.sum().to(dtype)
        else:
            rows = mask.any(-1, keepdim=True)
            total = torch.where(rows, w, zero).sum()
            count = rows.sum().to(dtype)
        mean = total / count.clamp(min=1)
        ok = mean > 1e-8  # verl skips the division when the mean is this small (or there is nothing)
        w = w / torch.where(ok, mean, torch.ones_like(mean))
    return torch.where(mask, w.expand(mask.shape), zero)


def importance_weights(
    old_logp: torch.Tensor,
    sampling_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    low: float | None = None,
    high: float | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    r"""Importance-sampling weights ``pi_old / pi_sampling`` that correct for the inference engine.

    ``x = old_logp - sampling_logp`` on valid tokens (a NaN difference counts as 0, as TRL's
    ``nan_to_num``); at ``level="sequence"`` ``x`` is summed over the row's valid tokens (the
    product of the token ratios). ``x`` is clamped to ``±20`` (verl; TRL does not clamp) and
    ``w = exp(x)``. Then

    * ``mode="truncate"`` (TIS, Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
      Off-Policy RL Training"): ``w = clamp(w, low, high)``;
    * ``mode="mask"`` (MIS / IcePop, Ling Team 2025, "Every Step Evolves", arXiv 2510.18855):
      ``w = 0`` where ``w < low`` or ``w > high`` (bounds inclusive: a weight equal to a bound is
      kept);

    a bound left ``None`` is open on that side. ``normalize=True`` (verl
    ``rollout_is_batch_normalize``) divides by the mean weight: the masked token mean at token
    level, the mean over non-empty rows of the row weights at sequence level; skipped when that
    mean is ``<= 1e-8`` (or nothing is valid). The result is 0 at masked positions.

    Peer settings, reproduced exactly:

    * TRL ``vllm_importance_sampling_mode``: ``token_truncate``, ``token_mask``,
      ``sequence_truncate``, ``sequence_mask`` are ``level="token"|"sequence"`` with
      ``mode="truncate"|"mask"``; ``vllm_importance_sampling_clip_max=C`` (older TRL:
      ``vllm_importance_sampling_cap=C``) is ``high=C``, ``vllm_importance_sampling_clip_min=c``
      is ``low=c`` (None in TRL: open).
    * verl ``rollout_is=lvl`` with ``rollout_is_threshold=U`` (TIS) is ``level=lvl,
      mode="truncate", high=U``; ``rollout_is_threshold="L_U"`` (IcePop) is ``level=lvl,
      mode="mask", low=L, high=U``; ``rollout_is_batch_normalize=True`` is ``normalize=True``
      (on one process: verl all-reduces that mean over ranks when distributed).

    Args:
        old_logp: ``[B, T]`` log-probs of the sampled tokens under the trainer's (old) policy.
        sampling_logp: ``[B, T]`` the same under the inference engine that sampled them.
        mask: ``[B, T]`` bool, or numeric where non-zero means valid.
        level: ``"token"`` or ``"sequence"``.
        mode: ``"truncate"`` or ``"mask"``.
        low, high: bounds on the weight (not its log), ``None`` for open; ``0 <= low <= high``,
            ``high > 0``.
        normalize: divide by the mean weight, as above.

    Returns:
        ``[B, T]`` detached weights, fp32 (fp64 for fp64 inputs), 0 where masked. Pass them to
        ``policy_loss(..., token_weights=w)``.

    Raises:
        ValueError: unknown ``level`` or ``mode``, shapes that differ, a negative ``low``, a
            non-positive ``high``, ``low > high``. TypeError: non-floating log-probs, a
            non-bool ``normalize``.
    """
    check_float("old_logp", old_logp, ndim=2)
    check_float("sampling_logp", sampling_logp, ndim=2)
    check_same_shape("sampling_logp", sampling_logp, "old_logp", old_logp)
    mask = check_mask("mask", mask, "old_logp", old_logp)
    check_same_device(old_logp=old_logp, sampling_logp=sampling_logp, mask=mask)
    check_choice("level", level, IS_LEVELS)
    check_choice("mode", mode, IS_MODES)
    _check_bounds(low, high)
    _check_bool("normalize", normalize)
    return _importance_weights_torch(old_logp, sampling_logp, mask, level, mode, low, high, normalize)


# ---------------------------------------------------------------------------------------------
# rejection_mask


def _rejection_mask_torch(
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    kind: str,
    level: str,
    low: float | None,
    high: float,
) -> torch.Tensor:
    dtype = compute_dtype(logp, rollout_logp)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    d = torch.where(mask, logp.detach().to(dtype) - rollout_logp.detach().to(dtype), zero)
    x = d.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    if kind == "k1":
        stat = -x
    elif kind == "k2":
        stat = 0.5 * x * x
    else:
        stat = torch.exp(x) - 1.0 - x
    if level == "seq_sum":
        stat = torch.where(mask, stat, zero).sum(-1, keepdim=True)
    elif level == "seq_mean":
        stat = torch.where(mask, stat, zero).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1).to(dtype)
    elif level == "seq_max":
        neg_inf = torch.full((), -math.inf, dtype=dtype, device=logp.device)
        stat = torch.where(mask, stat, neg_inf).amax(-1, keepdim=True)
    if kind == "k1":
        lo = 1.0 / high if low is None else low
        keep = (stat >= math.log(lo)) & (stat <= math.log(high))
    else:
        keep = stat <= high
    return keep & mask


def rejection_mask(
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "k1",
    level: str = "token",
    low: float | None = None,
    high: float,
) -> torch.Tensor:
    r"""Keep-mask of tokens or sequences whose divergence from the rollout policy stays in bounds.

    ``x = clamp(sg(logp) - rollout_logp, ±20)`` per valid token (``logp``: the trainer's
    log-probs, usually ``old_logp``), and the divergence estimators of Schulman's "Approximating
    KL divergence" note: ``k1 = -x``, ``k2 = x^2/2``, ``k3 = exp(x) - 1 - x``. At
    ``level="token"`` each token's own value is tested; ``"seq_sum"``, ``"seq_mean"``,
    ``"seq_max"`` test the row's masked sum, mean or max (``"seq_max"`` not with ``k1``) and keep
    or drop the whole row. ``k1`` keeps ``log(low) <= stat <= log(high)`` (``low=None``:
    ``1/high``); ``k2``/``k3`` keep ``stat <= high`` (they are >= 0; ``low`` is refused). The
    result is ANDed with ``mask``. Note the ``k1`` statistic is ``log(pi_rollout / pi)``, the
    inverse of the importance ratio, so ``low``/``high`` bound ``pi_rollout / pi``.

    A NaN log-prob at a valid token rejects that token (token level) or its row (row levels):
    a comparison with NaN is false.

    This is verl's ``rollout_rs`` (the "rejection sampling" of Liu, Li et al. 2025, "When Speed
    Kills Stability: Demystifying RL Collapse from the Training-Inference Mismatch"): option
    ``"{level}_{kind}"`` (``token_k1``, ``seq_mean_k3``, ...) with ``rollout_rs_threshold``
    ``"L_U"`` is ``kind, level, low=L, high=U``, and a single ``U`` is ``high=U``. verl's
    comma-separated list of several options keeps what every option keeps: AND the masks of
    several calls (``m1 & m2``).

    Args:
        logp: ``[B, T]`` the trainer's log-probs of the sampled tokens (detached here).
        rollout_logp: ``[B, T]`` the inference engine's.
        mask: ``[B, T]`` bool, or numeric where non-zero means valid.
        kind: ``"k1" | "k2" | "k3"``.
        level: ``"token" | "seq_sum" | "seq_mean" | "seq_max"``.
        low: ``k1`` only: the lower bound on the ratio ``pi_rollout/pi``, ``0 < low <= high``;
            None means ``1/high``.
        high: the upper bound (on the ratio for ``k1``, on the statistic for ``k2``/``k3``), > 0.

    Returns:
        ``[B, T]`` bool keep-mask, False wherever ``mask`` is. Combine it with the loss mask:
        ``policy_loss(..., mask=mask & keep)``.

    Raises:
        ValueError: unknown ``kind`` or ``level``, ``seq_max`` with ``k1``, ``low`` with ``k2``/
            ``k3``, a non-positive bound, ``low > high``, shapes that differ.
    """
    check_float("logp", logp, ndim=2)
    check_float("rollout_logp", rollout_logp, ndim=2)
    check_same_shape("rollout_logp", rollout_logp, "logp", logp)
    mask = check_mask("mask", mask, "logp", logp)
    check_same_device(logp=logp, rollout_logp=rollout_logp, mask=mask)
    check_choice("kind", kind, RS_KINDS)
    check_choice("level", level, RS_LEVELS)
    if level == "seq_max" and kind == "k1":
        raise ValueError('level="seq_max" needs kind "k2" or "k3" (k1 can be negative; verl has no seq_max_k1), '
                         'got kind="k1"')
    check_number("high", high, low=0, low_inclusive=False)
    if kind == "k1":
        check_number("low", low, low=0, low_inclusive=False, allow_none=True)
        if low is not None and low > high:
            raise ValueError(f"low must be <= high, got low={low!r} > high={high!r}")
    elif low is not None:
        raise ValueError(f"low is only for kind='k1' (a bound on the ratio); kind={kind!r} keeps stat <= high, "
                         f"got low={low!r}")
    return _rejection_mask_torch(logp, rollout_logp, mask, kind, level, low, high)


# ---------------------------------------------------------------------------------------------
# off_policy_mask


def _off_policy_mask_torch(
    logp: torch.Tensor,
    sampling_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    dtype = compute_dtype(logp, sampling_logp, adv)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    term = sampling_logp.detach().to(dtype) - logp.detach().to(dtype)
    term = torch.where(mask & ~torch.isnan(term), term, zero)  # a NaN term counts as 0
    kl = term.sum(-1) / mask.sum(-1).clamp(min=1).to(dtype)
    return (adv.detach() >= 0) | (kl <= threshold)


def off_policy_mask(
    logp: torch.Tensor,
    sampling_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    threshold: float,
) -> torch.Tensor:
    r"""DeepSeek-V3.2's off-policy sequence mask: drop negative-advantage rows that drifted too far.

    Keep row ``i`` iff ``A_i >= 0`` or ``sum_t m*(sampling_logp - sg(logp)) / max(n_i, 1) <=
    threshold``: the row's mean of ``log(pi_sampling/pi)``, an estimate of
    ``KL(pi_sampling || pi)`` (a NaN term counts as 0; an empty row's mean is 0). A sample that
    both lowers its probability (``A < 0``) and comes from a policy far from the current one is
    the one that destabilises training (DeepSeek-AI 2025, "DeepSeek-V3.2", arXiv 2512.02556).

    TRL ``off_policy_mask_threshold=threshold`` (``get_off_policy_mask``): TRL passes the
    engine's ``sampling_logp`` when it has them, else ``old_logp``; do the same.

    Args:
        logp: ``[B, T]`` the current policy's log-probs (detached here).
        sampling_logp: ``[B, T]`` the log-probs of the policy that sampled.
        adv: ``[B]`` per-sequence advantages.
        mask: ``[B, T]`` bool, or numeric where non-zero means valid.
        threshold: the bound on the row mean (any finite number; DeepSeek-V3.2's ``delta``).

    Returns:
        ``[B]`` bool, True for kept rows. Use ``mask & keep[:, None]`` (or pass
        ``keep[:, None]``'s float as ``token_weights``).
    """
    check_float("logp", logp, ndim=2)
    check_float("sampling_logp", sampling_logp, ndim=2)
    check_same_shape("sampling_logp", sampling_logp, "logp", logp)
    mask = check_mask("mask", mask, "logp", logp)
    check_float("adv", adv, ndim=1)
    if adv.shape[0] != logp.shape[0]:
        raise ValueError(f"adv must be [B]={[logp.shape[0]]} (one advantage per row of logp), got {list(adv.shape)}")
    check_same_device(logp=logp, sampling_logp=sampling_logp, adv=adv, mask=mask)
    check_number("threshold", threshold)
    return _off_policy_mask_torch(logp, sampling_logp, adv, mask, threshold)


# ---------------------------------------------------------------------------------------------
# top_entropy_mask


def _masked_quantile(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values[valid], q)`` (linear interpolation), without a dynamic shape.

    Bit for bit the arithmetic of ``torch.quantile``: the valid values sorted, rank
    ``r = q * (n - 1)`` in the values' dtype, ``lerp(v[floor r], v[ceil r], r - floor r)``; NaN
    if a valid value is NaN. Invalid entries sort last as ``+inf`` and are never reached.
    ``n = 0`` gives an unspecified value (callers keep nothing then). 0-d result.
    """
    values = values.reshape(-1)
    valid = valid.reshape(-1)
    inf = torch.full((), math.inf, dtype=values.dtype, device=values.device)
    ordered = torch.sort(torch.where(valid, values, inf)).values
    n = valid.sum()
    ranks = torch.full((), q, dtype=values.dtype, device=values.device) * (n - 1).to(values.dtype)
    ranks = ranks.clamp(min=0)
    below = ranks.to(torch.long)
    above = ranks.ceil().to(torch.long)
    v_below = ordered.gather(0, below.reshape(1))
    v_above = ordered.gather(0, above.reshape(1))
    out = torch.lerp(v_below, v_above, (ranks - below.to(values.dtype)).reshape(1)).reshape(())
    has_nan = (torch.isnan(values) & valid).any()
    return torch.where(has_nan, torch.full((), math.nan, dtype=values.dtype, device=values.device), out)


def _top_entropy_mask_torch(entropy: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    e = entropy.detach().to(compute_dtype(entropy))
    threshold = _masked_quantile(e, mask, 1.0 - fraction)
    return mask & (e >= threshold)


def _check_top_entropy(entropy: object, mask: object, fraction: object) -> torch.Tensor:
    check_float("entropy", entropy)
    mask = check_mask("mask", mask, "entropy", entropy)
    check_same_device(entropy=entropy, mask=mask)
    check_number("fraction", fraction, low=0, low_inclusive=False, high=1)
    return mask


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, *, fraction: float) -> torch.Tensor:
    r"""Keep-mask of the ``fraction`` of valid tokens with the highest entropy ("forking tokens").

    Keeps valid tokens with ``entropy >= torch.quantile(valid entropies, 1 - fraction)``, the
    quantile linearly interpolated between the order statistics, as ``torch.quantile``; no valid
    token gives all False, and a NaN among the valid entropies gives a NaN quantile and all False
    (as ``torch.quantile``). Ties at the threshold are all kept, so a little more than
    ``fraction`` may be. ``fraction=1`` keeps every valid token.

    Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RL
    for LLM Reasoning" (arXiv 2506.01939): the policy gradient on the top 20 % of tokens by
    entropy alone matches or beats the full gradient. TRL ``top_entropy_quantile=rho`` is
    ``fraction=rho`` (``get_high_entropy_mask``, whose quantile is over all processes:
    ``rlloss.distributed.top_entropy_mask`` is that).

    Precision (a choice where SPEC leaves room): the quantile and the comparison are done in
    fp32 for fp32/bf16/fp16 entropies, so each entropy is compared at its exact value, as TRL
    compares in fp32 (its ``entropies * mask.float()``); fp64 entropies stay fp64 throughout,
    as every fp64 input does in rlloss (so ``fraction=1`` keeps the minimum exactly).
    Unlike ``torch.quantile`` there is no limit on the number of tokens (it refuses more than
    2^24), and no dynamic shape: the reference compiles with ``fullgraph=True``.

    Args:
        entropy: floating tensor of per-token entropies (usually ``[B, T]``).
        mask: same shape, bool or numeric where non-zero means valid.
        fraction: in ``(0, 1]``, the share of valid tokens to keep.

    Returns:
        bool tensor of ``entropy``'s shape: use ``mask & keep`` as the loss mask.
    """
    mask = _check_top_entropy(entropy, mask, fraction)
    return _top_entropy_mask_torch(entropy, mask, fraction)
