"""Group-relative advantages (GRPO, RLOO, Dr. GRPO)."""

from __future__ import annotations

import torch

from ._dispatch import resolve_backend
from ._validate import check_choice, check_groups, check_number, check_tensor, compute_dtype

BASELINES = ("mean", "loo")
SCALES = ("group", "batch", "none")
SINGLETONS = ("zero", "keep")


def group_index(groups: int | torch.Tensor, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Dense group index ``[n]`` in ``0..K-1`` and the number of groups ``K``.

    An int group size means contiguous groups (TRL's layout); a tensor holds arbitrary group ids
    (verl's ``index``), renumbered here in order of first sorted id.
    """
    if isinstance(groups, int):
        return torch.arange(n, device=device) // groups, n // groups
    uniq, inverse = torch.unique(groups, return_inverse=True)
    return inverse, int(uniq.numel())


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
    groups: int | torch.Tensor,
    *,
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
        groups: int ``G`` (``N`` divisible by ``G``; responses of a prompt contiguous, TRL's
            layout) or an integer tensor ``[N]`` of group ids (any order, any sizes; verl).
        baseline, scale, eps, singleton: as above.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``[N]`` advantages, fp32 (fp64 for fp64 rewards). Differentiable in ``rewards``.

    Raises:
        ValueError: NaN or infinite rewards, groups not dividing ``N``, unknown options, ``eps < 0``.
    """
    check_tensor("rewards", rewards, ndim=1)
    if rewards.is_complex():
        raise TypeError(f"rewards must be real, got {rewards.dtype}")
    groups = check_groups(groups, rewards.shape[0], rewards.device)
    check_choice("baseline", baseline, BASELINES)
    check_choice("scale", scale, SCALES)
    check_choice("singleton", singleton, SINGLETONS)
    check_number("eps", eps, low=0)
    if rewards.dtype.is_floating_point and not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite, got NaN or inf values")
    if not rewards.dtype.is_floating_point:
        rewards = rewards.to(torch.float32)
    if resolve_backend(backend, rewards) == "triton":
        from .kernels.advantages import group_advantages_triton

        return group_advantages_triton(rewards, groups, baseline, scale, eps, singleton)
    return _group_advantages_torch(rewards, groups, baseline, scale, eps, singleton)
