"""Group-relative advantage estimators: one score per sequence, a baseline from its group.

``group_advantages`` (GRPO, RLOO, Dr. GRPO; reference and fused kernel) and the group estimators of
verl's ``core_algos``: REINFORCE++-baseline, OPO, GPG, pass@k, GDPO. The token-level returns and
their baselines (``whiten``, discounted returns, REINFORCE++, ReMax, the optimal token baseline)
live in ``rlloss.returns``.
"""

from __future__ import annotations

import math

import torch

from ._constants import SCALES, SINGLETONS
from ._dispatch import resolve_backend
from ._groups import group_amax, group_index, group_sum
from ._validate import (
    check_choice,
    check_float,
    check_groups,
    check_number,
    check_same_device,
    check_scores,
    check_tensor,
    check_values,
    compute_dtype,
)
from .returns import _whiten_torch

BASELINES = ("mean", "loo")


def _safe_sqrt(var: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not NaN) gradient where ``var == 0``: all-equal groups stay finite."""
    positive = var > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))), torch.zeros_like(var))


def _group_stats(r: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group size, sum and unbiased std of ``r`` (``[k]`` each; std 0 for groups of one)."""
    count = torch.zeros(k, dtype=r.dtype, device=r.device).index_add(0, index, torch.ones_like(r))
    total = torch.zeros(k, dtype=r.dtype, device=r.device).index_add(0, index, r)
    mean = total / count
    sq = torch.zeros(k, dtype=r.dtype, device=r.device).index_add(0, index, (r - mean[index]) ** 2)
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.zeros_like(sq))
    return count, total, _safe_sqrt(var)


def _group_advantages_torch(
    rewards: torch.Tensor,
    groups: int | torch.Tensor,
    baseline: str,
    scale: str,
    eps: float,
    singleton: str,
) -> torch.Tensor:
    r = rewards.to(compute_dtype(rewards))
    n = r.shape[0]
    index, k = group_index(groups, n, r.device)
    count, total, std = _group_stats(r, index, k)
    n_i, s_i = count[index], total[index]
    alone = n_i == 1

    if baseline == "mean":
        b = s_i / n_i
    else:  # leave-one-out: the mean of the other samples of the group
        b = (s_i - r) / (n_i - 1).clamp(min=1)
    b = torch.where(alone, torch.zeros_like(b), b)

    if scale == "group":
        denom = torch.where(alone, torch.ones_like(std[index]), std[index] + eps)
    elif scale == "batch":
        mean_all = r.mean()
        var_all = ((r - mean_all) ** 2).sum() / max(n - 1, 1)
        denom = (_safe_sqrt(var_all) + eps).expand(n)
    else:
        denom = torch.ones_like(r)
    adv = (r - b) / denom
    if singleton == "zero":
        adv = torch.where(alone, torch.zeros_like(adv), adv)
    return adv


def group_advantages(
    rewards: torch.Tensor,
    groups: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    baseline: str = "mean",
    scale: str = "group",
    eps: float = 1e-6,
    singleton: str = "zero",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Group-relative advantage of each sampled response.

    ``A_i = (r_i - b_i) / (std_g + eps)``, where ``g`` is the group of ``i`` (the ``G`` responses
    sampled for one prompt):

    * ``baseline="mean"``: ``b_i = mean_{j in g} r_j`` (GRPO, Shao et al. 2024, "DeepSeekMath",
      arXiv 2402.03300); ``"loo"``: the mean of the group without ``i`` (RLOO, Ahmadian et al.
      2024, arXiv 2402.14740).
    * ``scale="group"``: ``std_g`` is the unbiased (n-1) std of the group, as ``torch.std``
      (GRPO); ``"batch"``: the unbiased std of all ``N`` rewards (TRL ``scale_rewards="batch"``);
      ``"none"``: ``A_i = r_i - b_i`` (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783: dividing by
      the group std biases the update towards questions that are too easy or too hard).
    * A sample alone in its group has no baseline: ``singleton="zero"`` gives it 0, like an
      all-equal group; ``"keep"`` gives it baseline 0 and group std 1 (verl), so it keeps its
      reward (divided by the batch std under ``scale="batch"``).

    An all-equal group gives finite zeros with zero gradient (its std is 0: ``0 / eps``).
    TRL uses ``eps=1e-4``, verl ``1e-6`` (the default here).

    Args:
        rewards: ``[N]`` scalar reward per response, floating (any precision), integer or bool.
        groups: an integer tensor ``[N]`` of group ids (any order, any sizes; verl's ``index``).
        group_size: int ``G``: contiguous groups of ``G`` (``N`` divisible by ``G``; the responses
            of a prompt next to each other, TRL's ``num_generations`` layout). Exactly one of
            ``groups`` and ``group_size``; an int given as ``groups`` is a ``TypeError`` (it could
            be read as a number of groups: ``groups=8`` over 8 prompts x 4 responses would
            silently normalise over groups of 8).
        baseline, scale, eps, singleton: as above.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``[N]`` advantages, fp32 (fp64 for fp64 rewards). Differentiable in ``rewards``.

    Example::

        # 8 prompts x 4 responses, contiguous
        adv = group_advantages(rewards, group_size=4)
        # verl: index[i] = the prompt of sample i
        adv = group_advantages(rewards, groups=index)

    Raises:
        ValueError: NaN or infinite rewards, ``group_size`` not dividing ``N``, unknown options,
            ``eps <= 0`` with a std scale (an all-equal group would give 0/0).
        TypeError: an int as ``groups``, both or neither of ``groups`` and ``group_size``.
    """
    check_tensor("rewards", rewards, ndim=1)
    if rewards.is_complex():
        raise TypeError(f"rewards must be real, got {rewards.dtype}")
    groups = check_groups(groups, group_size, rewards.shape[0], rewards.device)
    check_choice("baseline", baseline, BASELINES)
    check_choice("scale", scale, SCALES)
    check_choice("singleton", singleton, SINGLETONS)
    # eps keeps an all-equal group (std 0) from dividing 0 by 0; it only matters where std divides
    check_number("eps", eps, low=0, low_inclusive=scale == "none")
    if rewards.dtype.is_floating_point:
        check_values(torch.isfinite(rewards), "rewards must be finite, got NaN or inf values")
    if not rewards.dtype.is_floating_point:
        rewards = rewards.to(torch.float32)
    if resolve_backend(backend, rewards) == "triton" and rewards.dtype != torch.float64:
        from ._fused import group_advantages_triton

        return group_advantages_triton(rewards, groups, baseline, scale, eps, singleton)
    return _group_advantages_torch(rewards, groups, baseline, scale, eps, singleton)


# =============================================================================================
# More group estimators (verl ``core_algos``): REINFORCE++-baseline, OPO, GPG, pass@k, GDPO.
#
# Grouped estimators take ``groups=`` (an id tensor) or ``group_size=`` (an int), exactly one, as
# ``group_advantages``; ``mask`` has a default only so that ``groups`` can: it is required.
# Each public function checks its arguments (values too, for the small per-sequence scores),
# renumbers tensor group ids (``torch.unique``: a dynamic shape, so outside the reference), then
# calls a ``_<name>_torch`` reference made of tensor operations only, which
# ``torch.compile(fullgraph=True)`` traces whole. Outputs are fp32 (fp64 for fp64 inputs),
# ``[N, T]``, 0 at masked positions (masked positions are selected out: NaN there never matters).
# =============================================================================================

PASSK_SCALES = ("group", "none")


def _check_row_mask(mask: object, n: int, like_name: str) -> torch.Tensor:
    """A ``[N, T]`` token mask whose rows are the ``N`` sequences of ``like_name``. Returns bool."""
    m = check_tensor("mask", mask, ndim=2)
    if m.shape[0] != n:
        raise ValueError(f"mask must have one row per sequence of {like_name}: [N={n}, T], got {list(m.shape)}")
    if m.is_complex():
        raise TypeError(f"mask must be bool or real numeric, got {m.dtype}")
    return m if m.dtype == torch.bool else m != 0


def _prepare_groups(groups: object, group_size: object, n: int, device: torch.device,
                    singleton: str | None) -> tuple[torch.Tensor, int]:
    groups = check_groups(groups, group_size, n, device)
    if singleton is not None:
        check_choice("singleton", singleton, SINGLETONS)
    return group_index(groups, n, device)


def _grouped_scores(scores: object, groups: object, group_size: object, mask: object,
                    singleton: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The checks every per-sequence-score estimator shares: (scores, bool mask, group index, K)."""
    scores = check_scores("scores", scores)
    mask = _check_row_mask(mask, scores.shape[0], "scores")
    check_same_device(scores=scores, mask=mask)
    index, k = _prepare_groups(groups, group_size, scores.shape[0], scores.device, singleton)
    return scores, mask, index, k


# --- group baselines ---------------------------------------------------------------------------


def _centered_scores(s: torch.Tensor, index: torch.Tensor, k: int, singleton: str) -> torch.Tensor:
    """``s_i - mean_g s`` with the singleton convention: 0 (``"zero"``) or ``s_i`` (``"keep"``)."""
    count = group_sum(torch.ones_like(s), index, k)[index]
    centered = s - group_sum(s, index, k)[index] / count
    alone = count == 1
    return torch.where(alone, s if singleton == "keep" else torch.zeros_like(s), centered)


def _reinforce_pp_baseline_torch(scores: torch.Tensor, index: torch.Tensor, k: int, mask: torch.Tensor,
                                 singleton: str) -> torch.Tensor:
    s = scores.to(compute_dtype(scores))
    centered = _centered_scores(s, index, k, singleton)
    return _whiten_torch(centered[:, None].expand(mask.shape), mask)


def reinforce_pp_baseline_advantages(scores: torch.Tensor, groups: torch.Tensor | None = None,
                                     mask: torch.Tensor | None = None, *,
                                     group_size: int | None = None, singleton: str = "zero") -> torch.Tensor:
    r"""REINFORCE++-baseline: ``s_i - mean_g s``, broadcast over the row's tokens, then ``whiten``.

    Hu et al. 2025, "REINFORCE++" (arXiv 2501.03262), the group-baseline variant (verl
    ``reinforce_plus_plus_baseline``): the group mean replaces GRPO's per-group std, and the
    whole batch is whitened over its valid tokens (so longer rows weigh more in the mean and
    variance).

    Singletons: ``"zero"`` gives a sample alone in its group a centred score of 0 before the
    whitening, like an all-equal group (after it, both get ``-mu/sd`` of the batch, not 0);
    ``"keep"`` gives it its raw score (baseline 0, verl).

    Args:
        scores: ``[N]`` one score per sequence (floating, integer or bool); finite.
        groups: ``[N]`` integer group ids; or ``group_size=G`` (contiguous groups of ``G``),
            exactly one of the two, as in ``group_advantages``.
        mask: ``[N, T]`` bool, or numeric where non-zero means valid.
        singleton: ``"zero" | "keep"``.

    Returns:
        ``[N, T]`` fp32 (fp64 for fp64 scores), 0 where masked.
    """
    scores, mask, index, k = _grouped_scores(scores, groups, group_size, mask, singleton)
    return _reinforce_pp_baseline_torch(scores, index, k, mask, singleton)


def _opo_torch(scores: torch.Tensor, index: torch.Tensor, k: int, mask: torch.Tensor,
               singleton: str) -> torch.Tensor:
    s = scores.to(compute_dtype(scores))
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    n_tok = mask.sum(-1).to(s.dtype)
    num = group_sum(n_tok * s, index, k)[index]
    den = group_sum(n_tok, index, k)[index]
    baseline = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), zero)
    alone = group_sum(torch.ones_like(s), index, k)[index] == 1
    adv = torch.where(alone, s if singleton == "keep" else zero, s - baseline)
    return torch.where(mask, adv[:, None], zero)


def opo_advantages(scores: torch.Tensor, groups: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, *,
                   group_size: int | None = None, singleton: str = "zero") -> torch.Tensor:
    r"""OPO advantages: ``s_i - sum_g n_j s_j / sum_g n_j``, the length-weighted group mean as baseline.

    Hao et al. 2025, "On-Policy RL with Optimal Reward Baseline" (arXiv 2505.23585): with exactly
    on-policy updates, the variance-minimising baseline weighs each response by its gradient
    norm, approximated by its length ``n_j`` (valid tokens of row ``j``); verl ``opo``. A group
    whose rows are all empty gets baseline 0 (verl divides 0 by 0); its rows are masked anyway.

    Singletons: ``"zero"`` gives 0; ``"keep"`` the raw score (baseline 0, verl).

    Args:
        scores: ``[N]`` one score per sequence; finite.
        groups: ``[N]`` integer group ids; or ``group_size=G`` (contiguous groups of ``G``),
            exactly one of the two, as in ``group_advantages``.
        mask: ``[N, T]`` bool, or numeric where non-zero means valid.
        singleton: ``"zero" | "keep"``.

    Returns:
        ``[N, T]`` fp32 (fp64 for fp64 scores), the advantage broadcast over valid tokens.
    """
    scores, mask, index, k = _grouped_scores(scores, groups, group_size, mask, singleton)
    return _opo_torch(scores, index, k, mask, singleton)


def _gpg_torch(scores: torch.Tensor, index: torch.Tensor, k: int, mask: torch.Tensor,
               singleton: str) -> torch.Tensor:
    s = scores.to(compute_dtype(scores))
    nonzero = (s != 0).sum().to(s.dtype)
    alpha = s.shape[0] / nonzero.clamp(min=1)
    adv = alpha * _centered_scores(s, index, k, singleton)
    return torch.where(mask, adv[:, None], torch.zeros((), dtype=s.dtype, device=s.device))


def gpg_advantages(scores: torch.Tensor, groups: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, *,
                   group_size: int | None = None, singleton: str = "zero") -> torch.Tensor:
    r"""GPG advantages: ``alpha * (s_i - mean_g s)``, ``alpha = N / max(#{s != 0}, 1)``.

    Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline for Model
    Reasoning" (arXiv 2504.02546): no std normalisation; ``alpha`` counts the non-zero scores of
    all ``N`` samples of the call, to undo the dilution of the batch gradient by samples without
    signal (verl ``gpg``, which counts ``torch.count_nonzero(scores)``). Use it with
    ``objective="reinforce"`` (GPG drops the ratio and its clip).

    Singletons: ``"zero"`` gives 0; ``"keep"`` gives ``alpha * s_i`` (baseline 0, verl).

    Args:
        scores: ``[N]`` one score per sequence; finite.
        groups: ``[N]`` integer group ids; or ``group_size=G`` (contiguous groups of ``G``),
            exactly one of the two, as in ``group_advantages``.
        mask: ``[N, T]`` bool, or numeric where non-zero means valid.
        singleton: ``"zero" | "keep"``.

    Returns:
        ``[N, T]`` fp32 (fp64 for fp64 scores), the advantage broadcast over valid tokens.
    """
    scores, mask, index, k = _grouped_scores(scores, groups, group_size, mask, singleton)
    return _gpg_torch(scores, index, k, mask, singleton)


def _passk_torch(scores: torch.Tensor, index: torch.Tensor, k: int, mask: torch.Tensor, scale: str,
                 eps: float) -> torch.Tensor:
    s = scores.to(compute_dtype(scores))
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    _, _, std = _group_stats(s, index, k)
    best = group_amax(s, index, k)
    is_best = s == best[index]
    n_best = group_sum(is_best.to(s.dtype), index, k)
    runner_up = group_amax(torch.where(is_best, torch.full_like(s, -math.inf), s), index, k)
    second = torch.where(n_best >= 2, best, runner_up)  # a tie for the best: the gap is 0
    gap = best - second
    if scale == "group":
        gap = gap / (std + eps)
    alone_best = is_best & (n_best[index] == 1)
    adv = torch.where(alone_best, gap[index], zero)
    return torch.where(mask, adv[:, None], zero)


def passk_advantages(scores: torch.Tensor, groups: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None, *,
                     group_size: int | None = None, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    r"""Pass@k advantages: only each group's best sample gets ``s_max - s_second``.

    The leave-one-out advantage of the max@k objective (Tang et al. 2025, "Optimizing Language
    Models for Inference Time Objectives using Reinforcement Learning", arXiv 2503.19595; verl
    ``grpo_passk``): removing any sample but the best leaves the group's max unchanged, removing
    the best lowers it to the second best. With ``scale="group"`` the gap is divided by
    ``std_g + eps`` (the unbiased group std; verl ``norm_adv_by_std_in_grpo=True``), with
    ``"none"`` it is not. A tie for the best gives every sample of the group 0 (the gap is 0
    whichever tied sample verl's ``topk`` picks).

    Args:
        scores: ``[N]`` one score per sequence; finite.
        groups: ``[N]`` integer group ids; or ``group_size=G`` (contiguous groups of ``G``),
            exactly one of the two, as in ``group_advantages``. Every group needs at least 2 samples.
        mask: ``[N, T]`` bool, or numeric where non-zero means valid.
        scale: ``"group" | "none"``.
        eps: added to the group std: ``> 0`` with ``scale="group"`` (as ``group_advantages``),
            ``>= 0`` (unused) with ``"none"``.

    Returns:
        ``[N, T]`` fp32 (fp64 for fp64 scores), the advantage broadcast over valid tokens.

    Raises:
        ValueError: a group of one sample (pass@k needs a second best, as verl), NaN scores,
            groups that do not match the scores, unknown ``scale``, ``eps <= 0`` with ``"group"``.
    """
    scores = check_scores("scores", scores)
    mask = _check_row_mask(mask, scores.shape[0], "scores")
    check_same_device(scores=scores, mask=mask)
    check_choice("scale", scale, PASSK_SCALES)
    # eps keeps an all-equal group (std 0) from dividing 0 by 0; it only matters where std divides
    check_number("eps", eps, low=0, low_inclusive=scale == "none")
    index, k = _prepare_groups(groups, group_size, scores.shape[0], scores.device, None)
    if scores.shape[0]:
        sizes = torch.bincount(index, minlength=k)
        if bool((sizes < 2).any()):
            raise ValueError(f"groups: pass@k needs at least 2 samples per group (a best and a second best), "
                             f"got a group of {int(sizes.min())}")
    return _passk_torch(scores, index, k, mask, scale, eps)


def _gdpo_torch(scores: torch.Tensor, index: torch.Tensor, k: int, mask: torch.Tensor,
                weights: torch.Tensor | None, eps: float, singleton: str) -> torch.Tensor:
    s = scores.to(compute_dtype(scores))  # [K, N]
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    count = group_sum(torch.ones_like(s[0]), index, k)  # [k]
    mean = group_sum(s.T, index, k).T / count  # [K, k]
    dev = s - mean[:, index]
    var = torch.where(count > 1, group_sum((dev * dev).T, index, k).T / (count - 1).clamp(min=1), zero)
    std = _safe_sqrt(var)
    alone = (count == 1)[index]
    denom = torch.where(alone, torch.ones_like(s), std[:, index] + eps)
    per_reward = torch.where(alone, s if singleton == "keep" else zero, dev) / denom
    if weights is not None:
        per_reward = per_reward * weights.to(s.dtype)[:, None]
    adv = per_reward.sum(0)
    return _whiten_torch(adv[:, None].expand(mask.shape), mask)


def gdpo_advantages(scores: torch.Tensor, groups: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, *,
                    group_size: int | None = None,
                    weights: torch.Tensor | list[float] | tuple[float, ...] | None = None, eps: float = 1e-6,
                    singleton: str = "zero") -> torch.Tensor:
    r"""GDPO advantages: the weighted sum of each reward's own GRPO advantage, then ``whiten``.

    Liu et al. 2026, "GDPO: Group reward-Decoupled Normalization Policy Optimization for
    Multi-reward RL" (arXiv 2601.05242; verl ``gdpo``): with several rewards, summing them
    before GRPO's group normalisation lets the widest reward drown the others; GDPO normalises
    each reward ``k`` within its group first, ``A_k = (s_k - mean_g)/(std_g + eps)`` (unbiased
    std), sums ``sum_k w_k A_k``, broadcasts over the row's tokens and whitens over the batch's
    valid tokens.

    Singletons: ``"zero"`` gives each ``A_k`` 0 for a sample alone in its group (before the
    whitening, like an all-equal group); ``"keep"`` gives ``A_k = s_k`` (baseline 0, std 1: no
    ``eps`` either, as ``group_advantages``; verl divides by ``1 + eps``).

    Args:
        scores: ``[K, N]`` ``K`` rewards of each of the ``N`` sequences; finite.
        groups: ``[N]`` integer group ids; or ``group_size=G`` (contiguous groups of ``G``),
            exactly one of the two, as in ``group_advantages``.
        mask: ``[N, T]`` bool, or numeric where non-zero means valid.
        weights: ``K`` finite weights (sequence or 1-D tensor), or None for all 1.
        eps: ``> 0``, added to each group std (an all-equal group would give 0/0 without it).
        singleton: ``"zero" | "keep"``.

    Returns:
        ``[N, T]`` fp32 (fp64 for fp64 scores), 0 where masked.
    """
    scores = check_scores("scores", scores, ndim=2)
    n = scores.shape[1]
    mask = _check_row_mask(mask, n, "scores (its second dimension)")
    check_same_device(scores=scores, mask=mask)
    # eps keeps an all-equal group (std 0) from dividing 0 by 0, as in group_advantages
    check_number("eps", eps, low=0, low_inclusive=False)
    if weights is not None:
        if isinstance(weights, (list, tuple)):
            for w in weights:
                check_number("weights", w)
            weights = torch.tensor(weights, dtype=torch.float64, device=scores.device)
        else:
            check_float("weights", weights, ndim=1)
            if not bool(torch.isfinite(weights).all()):
                raise ValueError("weights must be finite, got NaN or inf values")
            check_same_device(scores=scores, weights=weights)
        if weights.shape[0] != scores.shape[0]:
            raise ValueError(f"weights must hold one weight per reward (K={scores.shape[0]}), got {weights.shape[0]}")
    index, k = _prepare_groups(groups, group_size, n, scores.device, singleton)
    return _gdpo_torch(scores, index, k, mask, weights, eps, singleton)
