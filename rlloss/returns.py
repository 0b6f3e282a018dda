"""Token-level returns and their baselines: ``whiten``, discounted returns, REINFORCE++, ReMax, and
the optimal token baseline (verl ``core_algos``).

Each takes per-token rewards ``[B, T]`` and a token mask and gives ``[B, T]`` advantages (or returns),
0 at masked positions. The group-relative estimators over one score per sequence (GRPO's, OPO, GPG,
pass@k, GDPO, REINFORCE++-baseline) live in ``rlloss.advantages``.

Each public function checks its arguments, renumbers tensor group ids (``torch.unique``: a dynamic
shape, so outside the reference), then calls a ``_<name>_torch`` reference made of tensor operations
only, which ``torch.compile(fullgraph=True)`` traces whole. Outputs are fp32 (fp64 for fp64 inputs),
``[B, T]``, 0 at masked positions (masked positions are selected out: NaN there never matters).
"""

from __future__ import annotations

import torch

from ._constants import SINGLETONS
from ._groups import group_amax, group_index, group_sum
from ._validate import (
    check_choice,
    check_float,
    check_groups,
    check_mask,
    check_number,
    check_same_device,
    check_same_shape,
    check_scores,
    compute_dtype,
)

WHITEN_EPS = 1e-8


def _whiten_torch(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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
    return _whiten_torch(x, mask)


def _discounted_returns_torch(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
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
    return _discounted_returns_torch(token_rewards, mask, float(gamma))


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
    return _whiten_torch(_discounted_returns_torch(token_rewards, mask, float(gamma)), mask)


# --- baselines over token returns -----------------------------------------------------------


def _remax_torch(token_rewards: torch.Tensor, mask: torch.Tensor, baseline_scores: torch.Tensor) -> torch.Tensor:
    returns = _discounted_returns_torch(token_rewards, mask, 1.0)
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
    baseline_scores = check_scores("baseline_scores", baseline_scores)
    if baseline_scores.shape[0] != token_rewards.shape[0]:
        raise ValueError(f"baseline_scores must be [B]={[token_rewards.shape[0]]} (one per row of token_rewards), "
                         f"got {list(baseline_scores.shape)}")
    check_same_device(token_rewards=token_rewards, baseline_scores=baseline_scores)
    return _remax_torch(token_rewards, mask, baseline_scores)


def _optimal_token_baseline_torch(
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
    returns = _discounted_returns_torch(token_rewards.to(dtype), mask, 1.0)
    w = 1.0 - 2.0 * torch.exp(old_logp.to(dtype)) + sum_pi_squared.to(dtype)
    if is_weights is not None:
        w = w * is_weights.to(dtype) ** 2
    W = torch.where(mask, w, zero).cumsum(-1)
    mW = torch.where(mask, W, zero)

    def rows_sum(x: torch.Tensor) -> torch.Tensor:  # per group and position: [k, T]
        if group_size is not None:  # contiguous groups: a deterministic reshape-sum
            return x.reshape(k, group_size, T).sum(1)
        return group_sum(x, index, k)

    num = rows_sum(mW * returns)
    den = rows_sum(mW) + 1e-8
    baseline = (num / den)[index]  # [B, T]
    n_rows = group_sum(torch.ones(B, dtype=dtype, device=mask.device), index, k)[index]
    alone = n_rows == 1
    if handle_zero_tail:
        length = mask.sum(-1)
        longest = group_amax(length.to(dtype), index, k)[index]
        is_longest = length.to(dtype) == longest
        n_longest = group_sum(is_longest.to(dtype), index, k)[index]
        second = group_amax(torch.where(is_longest, torch.full_like(longest, -1.0), length.to(dtype)), index, k)
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
    return _optimal_token_baseline_torch(token_rewards, mask, index, k, group_size, old_logp, sum_pi_squared,
                                         is_weights, handle_zero_tail, singleton)
