"""Advantage estimators: group-relative (GRPO, RLOO, Dr. GRPO) and the others of verl's ``core_algos``."""

from __future__ import annotations

import math

import torch

from ._dispatch import resolve_backend
from ._groups import group_index
from ._validate import (
    check_choice,
    check_float,
    check_groups,
    check_mask,
    check_number,
    check_same_device,
    check_same_shape,
    check_tensor,
    check_values,
    compute_dtype,
)

BASELINES = ("mean", "loo")
SCALES = ("group", "batch", "none")
SINGLETONS = ("zero", "keep")


def _safe_sqrt(var: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not NaN) gradient where ``var == 0``: all-equal groups stay finite."""
    positive = var > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))), torch.zeros_like(var))


def group_stats(r: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    count, total, std = group_stats(r, index, k)
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

        adv = group_advantages(rewards, group_size=4)   # 8 prompts x 4 responses, contiguous
        adv = group_advantages(rewards, groups=index)   # verl: index[i] = the prompt of sample i

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
# More advantage estimators (verl ``core_algos``): whiten, returns, REINFORCE++, ReMax, OPO, GPG,
# pass@k, GDPO, optimal token baseline.
#
# Grouped estimators take ``groups=`` (an id tensor) or ``group_size=`` (an int), exactly one, as
# ``group_advantages``; ``mask`` has a default only so that ``groups`` can: it is required.
# Each public function checks its arguments (values too, for the small per-sequence scores),
# renumbers tensor group ids (``torch.unique``: a dynamic shape, so outside the reference), then
# calls a ``_..._reference`` made of tensor operations only, which ``torch.compile(fullgraph=True)``
# traces whole. Outputs are fp32 (fp64 for fp64 inputs), ``[B, T]``, 0 at masked positions
# (masked positions are selected out: NaN there never matters).
# =============================================================================================

PASSK_SCALES = ("group", "none")
WHITEN_EPS = 1e-8


def _check_scores(name: str, scores: object, *, ndim: int = 1) -> torch.Tensor:
    """Per-sequence scores: real, finite; integer or bool scores become fp32."""
    check_tensor(name, scores, ndim=ndim)
    if scores.is_complex():
        raise TypeError(f"{name} must be real, got {scores.dtype}")
    if not scores.dtype.is_floating_point:
        return scores.to(torch.float32)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} must be finite, got NaN or inf values")
    return scores


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
    scores = _check_scores("scores", scores)
    mask = _check_row_mask(mask, scores.shape[0], "scores")
    check_same_device(scores=scores, mask=mask)
    index, k = _prepare_groups(groups, group_size, scores.shape[0], scores.device, singleton)
    return scores, mask, index, k


def _group_sum(x: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group sum over the first dimension: ``[k, ...]``."""
    return torch.zeros((k, *x.shape[1:]), dtype=x.dtype, device=x.device).index_add(0, index, x)


def _group_amax(x: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group max of ``x`` ``[N]`` (``-inf`` for a group with no member)."""
    init = torch.full((k,), -math.inf, dtype=x.dtype, device=x.device)
    return init.scatter_reduce(0, index, x, reduce="amax", include_self=True)


# --- whiten and returns ------------------------------------------------------------------------


def _whiten_reference(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(x)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    xv = torch.where(mask, x.to(dtype), zero)  # selected out first: NaN there reaches no gradient either
    n = mask.sum().to(dtype)
    mu = xv.sum() / n.clamp(min=1)
    dev = torch.where(mask, xv - mu, zero)
    var = torch.where(n >= 2, (dev * dev).sum() / (n - 1).clamp(min=1), zero)
    return dev / torch.sqrt(var + WHITEN_EPS)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""``(x - mu) / sqrt(var + 1e-8)`` over the valid entries of the whole call, 0 where masked.

    ``mu`` is the masked mean and ``var`` the unbiased (n-1) masked variance of all valid tokens of
    the call (verl ``masked_whiten``, the batch normalisation of REINFORCE++ and GDPO). Fewer than
    2 valid tokens: ``var = 0`` (verl raises); none: all zeros. Differentiable in ``x``.

    Args:
        x: floating tensor, any shape (usually ``[B, T]``).
        mask: same shape, bool or numeric where non-zero means valid.

    Returns:
        fp32 (fp64 for fp64 ``x``) tensor of ``x``'s shape.
    """
    check_float("x", x)
    mask = check_mask("mask", mask, "x", x)
    return _whiten_reference(x, mask)


def _discounted_returns_reference(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    dtype = compute_dtype(token_rewards)
    zero = torch.zeros((), dtype=dtype, device=token_rewards.device)
    b = torch.where(mask, token_rewards.to(dtype), zero)
    if gamma == 1.0:  # the reward-to-go: a reverse cumulative sum
        c = b.flip(-1).cumsum(-1).flip(-1)
    else:
        # c_t = b_t + a_t * c_{t+1} with a_t = gamma on valid tokens and 1 on masked ones (they pass
        # the running return through), as a suffix scan in ceil(log2 T) doubling steps: after the
        # step of offset d, (a_t, b_t) is the composition of the maps of positions t .. t+2d-1.
        a = torch.where(mask, torch.full((), gamma, dtype=dtype, device=b.device), torch.ones((), dtype=dtype,
                                                                                             device=b.device))
        d, length = 1, b.shape[-1]
        while d < length:
            b = b + a * torch.nn.functional.pad(b[..., d:], (0, d))
            if 2 * d < length:  # the last step's products are never used
                a = a * torch.nn.functional.pad(a[..., d:], (0, d))
            d *= 2
        c = b
    return torch.where(mask, c, zero)


def _check_token_rewards(token_rewards: object, mask: object) -> torch.Tensor:
    check_float("token_rewards", token_rewards, ndim=2)
    mask = check_mask("mask", mask, "token_rewards", token_rewards)
    check_same_device(token_rewards=token_rewards, mask=mask)
    return mask


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    r"""Discounted reward-to-go per token: ``G_t = r_t + gamma * G_{t+1}`` over the valid tokens.

    A backward scan along each row: a masked position returns 0 and passes the running return
    through unchanged, so a masked span inside a row (a tool's output) neither adds reward nor
    discounts. With ``gamma=1`` this is the reverse cumulative sum of the masked rewards.
    (verl's REINFORCE++ loop instead resets the running return at every masked position; with
    right padding and zero rewards on the padding, the usual layout, the two agree.)

    For ``gamma < 1`` the scan runs in ``ceil(log2 T)`` doubling steps (``b_t += a_t*b_{t+d}``,
    ``a_t *= a_{t+d}``), not one step per token: the sums are reassociated, so values agree with
    a sequential loop to rounding.

    Args:
        token_rewards: ``[B, T]`` floating per-token rewards (an outcome reward sits on the last
            valid token).
        mask: ``[B, T]`` bool, or numeric where non-zero means valid.
        gamma: discount in ``[0, 1]``.

    Returns:
        ``[B, T]`` fp32 (fp64 for fp64 rewards), 0 where masked. Differentiable in the rewards.
    """
    mask = _check_token_rewards(token_rewards, mask)
    check_number("gamma", gamma, low=0, high=1)
    return _discounted_returns_reference(token_rewards, mask, float(gamma))


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    r"""REINFORCE++ advantages: ``whiten(discounted_returns(token_rewards, mask, gamma=gamma), mask)``.

    Hu et al. 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
    Models" (arXiv 2501.03262): no critic; the discounted return of each token, normalised over
    the whole batch (verl ``reinforce_plus_plus``, ``algorithm.gamma``).

    Returns:
        ``[B, T]`` fp32 (fp64 for fp64 rewards), 0 where masked.
    """
    mask = _check_token_rewards(token_rewards, mask)
    check_number("gamma", gamma, low=0, high=1)
    return _whiten_reference(_discounted_returns_reference(token_rewards, mask, float(gamma)), mask)


# --- group baselines ---------------------------------------------------------------------------


def _centered_scores(s: torch.Tensor, index: torch.Tensor, k: int, singleton: str) -> torch.Tensor:
    """``s_i - mean_g s`` with the singleton convention: 0 (``"zero"``) or ``s_i`` (``"keep"``)."""
    count = _group_sum(torch.ones_like(s), index, k)[index]
    centered = s - _group_sum(s, index, k)[index] / count
    alone = count == 1
    return torch.where(alone, s if singleton == "keep" else torch.zeros_like(s), centered)


def _reinforce_pp_baseline_reference(scores: torch.Tensor, index: torch.Tensor, k: int, mask: torch.Tensor,
                                     singleton: str) -> torch.Tensor:
    s = scores.to(compute_dtype(scores))
    centered = _centered_scores(s, index, k, singleton)
    return _whiten_reference(centered[:, None].expand(mask.shape), mask)


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
    return _reinforce_pp_baseline_reference(scores, index, k, mask, singleton)


def _remax_reference(token_rewards: torch.Tensor, mask: torch.Tensor, baseline_scores: torch.Tensor) -> torch.Tensor:
    returns = _discounted_returns_reference(token_rewards, mask, 1.0)
    b = baseline_scores.to(returns.dtype)
    return torch.where(mask, returns - b[:, None], torch.zeros((), dtype=returns.dtype, device=returns.device))


def remax_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, baseline_scores: torch.Tensor) -> torch.Tensor:
    r"""ReMax advantages: the reward-to-go minus the greedy response's score, ``(G_t - b_i) * m``.

    Li et al. 2024, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for
    Aligning Large Language Models" (arXiv 2310.10505): the baseline of a sampled response is the
    reward of the greedy response to the same prompt (verl ``remax``, ``reward_baselines``).
    ``G = discounted_returns(gamma=1)``. Unlike verl, which leaves the reward-to-go at masked
    positions inside a row, the result is 0 at every masked position.

    Args:
        token_rewards: ``[B, T]`` floating per-token rewards.
        mask: ``[B, T]`` bool, or numeric where non-zero means valid.
        baseline_scores: ``[B]`` the greedy response's score for each row's prompt; finite.

    Returns:
        ``[B, T]`` fp32 (fp64 for fp64 inputs), 0 where masked.
    """
    mask = _check_token_rewards(token_rewards, mask)
    baseline_scores = _check_scores("baseline_scores", baseline_scores)
    if baseline_scores.shape[0] != token_rewards.shape[0]:
        raise ValueError(f"baseline_scores must be [B]={[token_rewards.shape[0]]} (one per row of token_rewards), "
                         f"got {list(baseline_scores.shape)}")
    check_same_device(token_rewards=token_rewards, baseline_scores=baseline_scores)
    return _remax_reference(token_rewards, mask, baseline_scores)


def _opo_reference(scores: torch.Tensor, index: torch.Tensor, k: int, mask: torch.Tensor,
                   singleton: str) -> torch.Tensor:
    s = scores.to(compute_dtype(scores))
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    n_tok = mask.sum(-1).to(s.dtype)
    num = _group_sum(n_tok * s, index, k)[index]
    den = _group_sum(n_tok, index, k)[index]
    baseline = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), zero)
    alone = _group_sum(torch.ones_like(s), index, k)[index] == 1
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
    return _opo_reference(scores, index, k, mask, singleton)


def _gpg_reference(scores: torch.Tensor, index: torch.Tensor, k: int, mask: torch.Tensor,
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
    return _gpg_reference(scores, index, k, mask, singleton)


def _passk_reference(scores: torch.Tensor, index: torch.Tensor, k: int, mask: torch.Tensor, scale: str,
                     eps: float) -> torch.Tensor:
    s = scores.to(compute_dtype(scores))
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    _, _, std = group_stats(s, index, k)
    best = _group_amax(s, index, k)
    is_best = s == best[index]
    n_best = _group_sum(is_best.to(s.dtype), index, k)
    runner_up = _group_amax(torch.where(is_best, torch.full_like(s, -math.inf), s), index, k)
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
    scores = _check_scores("scores", scores)
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
    return _passk_reference(scores, index, k, mask, scale, eps)


def _gdpo_reference(scores: torch.Tensor, index: torch.Tensor, k: int, mask: torch.Tensor,
                    weights: torch.Tensor | None, eps: float, singleton: str) -> torch.Tensor:
    s = scores.to(compute_dtype(scores))  # [K, N]
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    count = _group_sum(torch.ones_like(s[0]), index, k)  # [k]
    mean = _group_sum(s.T, index, k).T / count  # [K, k]
    dev = s - mean[:, index]
    var = torch.where(count > 1, _group_sum((dev * dev).T, index, k).T / (count - 1).clamp(min=1), zero)
    std = _safe_sqrt(var)
    alone = (count == 1)[index]
    denom = torch.where(alone, torch.ones_like(s), std[:, index] + eps)
    per_reward = torch.where(alone, s if singleton == "keep" else zero, dev) / denom
    if weights is not None:
        per_reward = per_reward * weights.to(s.dtype)[:, None]
    adv = per_reward.sum(0)
    return _whiten_reference(adv[:, None].expand(mask.shape), mask)


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
    scores = _check_scores("scores", scores, ndim=2)
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
    return _gdpo_reference(scores, index, k, mask, weights, eps, singleton)


def _optimal_token_baseline_reference(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    index: torch.Tensor,
    k: int,
    group_size: int | None,
    old_logp: torch.Tensor,
    sum_pi_squared: torch.Tensor,
    is_weights: torch.Tensor | None,
    handle_zero_tail: bool,
    singleton: str,
) -> torch.Tensor:
    dtype = compute_dtype(token_rewards, old_logp, sum_pi_squared, is_weights)
    zero = torch.zeros((), dtype=dtype, device=token_rewards.device)
    B, T = mask.shape
    returns = _discounted_returns_reference(token_rewards.to(dtype), mask, 1.0)
    w = 1.0 - 2.0 * torch.exp(old_logp.to(dtype)) + sum_pi_squared.to(dtype)
    if is_weights is not None:
        w = w * is_weights.to(dtype) ** 2
    W = torch.where(mask, w, zero).cumsum(-1)
    mW = torch.where(mask, W, zero)

    def rows_sum(x: torch.Tensor) -> torch.Tensor:  # per group and position: [k, T]
        if group_size is not None:  # contiguous groups: a deterministic reshape-sum
            return x.reshape(k, group_size, T).sum(1)
        return _group_sum(x, index, k)

    num = rows_sum(mW * returns)
    den = rows_sum(mW) + 1e-8
    baseline = (num / den)[index]  # [B, T]
    n_rows = _group_sum(torch.ones(B, dtype=dtype, device=mask.device), index, k)[index]
    alone = n_rows == 1
    if handle_zero_tail:
        length = mask.sum(-1)
        longest = _group_amax(length.to(dtype), index, k)[index]
        is_longest = length.to(dtype) == longest
        n_longest = _group_sum(is_longest.to(dtype), index, k)[index]
        second = _group_amax(torch.where(is_longest, torch.full_like(longest, -1.0), length.to(dtype)), index, k)
        unique = is_longest & (n_longest == 1) & ~alone
        positions = torch.arange(T, device=mask.device, dtype=dtype)
        tail = unique[:, None] & (positions[None, :] >= second[index][:, None])
        baseline = torch.where(tail, zero, baseline)
    baseline = torch.where(alone[:, None], zero, baseline)
    adv = torch.where(mask, returns - baseline, zero)
    if singleton == "zero":
        adv = torch.where(alone[:, None], zero, adv)
    return adv


def optimal_token_baseline_advantages(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    groups: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    sum_pi_squared: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    is_weights: torch.Tensor | None = None,
    handle_zero_tail: bool = True,
    singleton: str = "zero",
) -> torch.Tensor:
    r"""Advantages with the optimal token baseline: one variance-minimising baseline per position.

    verl ``optimal_token_baseline`` (after the minimum-variance baseline of Greensmith et al.
    2004, "Variance Reduction Techniques for Gradient Estimates in Reinforcement Learning",
    JMLR 5, with ``||grad log pi||^2`` approximated per token by ``1 - 2*pi_t + sum_v pi_v^2``):

    * ``G = discounted_returns(token_rewards, mask, gamma=1)``, the reward-to-go;
    * ``W_t = cumsum_t(m * (1 - 2*exp(old_logp) + sum_pi_squared) * is_weights^2)`` (``None``:
      1), the path's accumulated score-function energy;
    * per group and position ``t``: ``b_t = sum_j m*G*W / (sum_j m*W + 1e-8)`` over the group's
      rows;
    * ``handle_zero_tail``: if exactly one row has the group's largest length ``n_i`` (valid
      tokens), it gets ``b_t = 0`` for positions ``t >= n_(2)``, the second-largest length (no
      other row estimates its baseline there);
    * ``A = (G - b) * m``.

    Singletons: ``"zero"`` gives 0; ``"keep"`` gives ``G * m`` (baseline 0, verl).

    Args:
        token_rewards: ``[B, T]`` floating per-token rewards.
        mask: ``[B, T]`` bool, or numeric where non-zero means valid.
        groups: ``[B]`` integer group ids; or ``group_size=G`` (contiguous groups of ``G`` rows),
            exactly one of the two, as in ``group_advantages``.
        old_logp: ``[B, T]`` log-probs of the sampled tokens under the policy that sampled.
        sum_pi_squared: ``[B, T]`` ``sum_v pi_v^2`` of each position's distribution.
        is_weights: None or ``[B, T]`` importance weights (``importance_weights``' output).
        handle_zero_tail: bool, as above.
        singleton: ``"zero" | "keep"``.

    Returns:
        ``[B, T]`` fp32 (fp64 for fp64 inputs), 0 where masked.
    """
    mask = _check_token_rewards(token_rewards, mask)
    check_float("old_logp", old_logp, ndim=2)
    check_same_shape("old_logp", old_logp, "token_rewards", token_rewards)
    check_float("sum_pi_squared", sum_pi_squared, ndim=2)
    check_same_shape("sum_pi_squared", sum_pi_squared, "token_rewards", token_rewards)
    if is_weights is not None:
        check_float("is_weights", is_weights, ndim=2)
        check_same_shape("is_weights", is_weights, "token_rewards", token_rewards)
    check_same_device(token_rewards=token_rewards, old_logp=old_logp, sum_pi_squared=sum_pi_squared,
                      is_weights=is_weights)
    if not isinstance(handle_zero_tail, bool):
        raise TypeError(f"handle_zero_tail must be a bool, got {type(handle_zero_tail).__name__} {handle_zero_tail!r}")
    groups = check_groups(groups, group_size, token_rewards.shape[0], token_rewards.device)
    check_choice("singleton", singleton, SINGLETONS)
    index, k = group_index(groups, token_rewards.shape[0], token_rewards.device)
    group_size = groups if isinstance(groups, int) else None
    return _optimal_token_baseline_reference(token_rewards, mask, index, k, group_size, old_logp, sum_pi_squared,
                                             is_weights, handle_zero_tail, singleton)
