"""DAPO's batch and length shaping: dynamic sampling and the soft overlong penalty."""

from __future__ import annotations

import torch

from ._dispatch import resolve_backend
from ._groups import group_index
from ._validate import check_groups, check_number, check_tensor, check_values


def _dynamic_sampling_mask_torch(rewards: torch.Tensor, groups: int | torch.Tensor) -> torch.Tensor:
    n = rewards.shape[0]
    index, k = group_index(groups, n, rewards.device)
    r = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    lo = torch.full((k,), float("inf"), dtype=r.dtype, device=r.device).scatter_reduce(0, index, r, "amin")
    hi = torch.full((k,), float("-inf"), dtype=r.dtype, device=r.device).scatter_reduce(0, index, r, "amax")
    return (hi > lo)[index]


def dynamic_sampling_mask(rewards: torch.Tensor, groups: torch.Tensor | None = None, *, group_size: int | None = None,
                          backend: str = "auto") -> torch.Tensor:
    r"""Which samples DAPO's dynamic sampling keeps: those whose group's rewards are not all equal.

    ``keep_i = max_{j in g(i)} r_j > min_{j in g(i)} r_j``. With 0/1 correctness rewards this is
    ``0 < #correct < G``. An all-equal group (and a group of one) has zero advantage under every
    group baseline, hence no gradient signal; DAPO (Yu et al. 2025, arXiv 2503.14476) drops such
    groups and samples more prompts until the batch is full.

    Args:
        rewards: ``[N]`` rewards (floating, integer or bool).
        groups: an integer tensor ``[N]`` of group ids.
        group_size: int ``G``: contiguous groups of ``G`` (``N`` divisible by ``G``). Exactly one of
            ``groups`` and ``group_size``, as in ``group_advantages`` (an int as ``groups`` is a
            ``TypeError``).
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        bool ``[N]``.
    """
    check_tensor("rewards", rewards, ndim=1)
    if rewards.is_complex():
        raise TypeError(f"rewards must be real, got {rewards.dtype}")
    groups = check_groups(groups, group_size, rewards.shape[0], rewards.device)
    if rewards.dtype.is_floating_point:
        check_values(~torch.isnan(rewards), "rewards must not contain NaN")
    if resolve_backend(backend, rewards) == "triton":
        from ._fused import dynamic_sampling_mask_triton

        return dynamic_sampling_mask_triton(rewards, groups)
    return _dynamic_sampling_mask_torch(rewards, groups)


def _soft_overlong_penalty_torch(lengths: torch.Tensor, max_len: int, cache_len: int, factor: float) -> torch.Tensor:
    length = lengths.to(torch.float64 if lengths.dtype == torch.float64 else torch.float32)
    start = max_len - cache_len  # lengths up to here are free
    ramp = factor * (start - length) / cache_len
    zero = torch.zeros_like(length)
    return torch.where(length <= start, zero, torch.where(length <= max_len, ramp, zero - factor))


def soft_overlong_penalty(
    lengths: torch.Tensor,
    *,
    max_len: int,
    cache_len: int,
    factor: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    r"""DAPO's soft overlong punishment, a reward term that grows as a response nears ``max_len``.

    ::

        R(L) = 0                                   if L <= max_len - cache_len
             = factor * (max_len - cache_len - L) / cache_len
                                                   if max_len - cache_len < L <= max_len
             = -factor                             if L > max_len

    From DAPO (Yu et al. 2025, arXiv 2503.14476, eq. 13), whose values are ``max_len=20480``,
    ``cache_len=4096`` (``recipes.DAPO``). Add it to the task reward before computing advantages.
    DAPO's companion "overlong filtering" masks whole truncated rows out of the loss: pass that
    through ``mask``.

    Args:
        lengths: ``[N]`` response lengths in tokens (integer or floating, non-negative).
        max_len: the maximum response length ``L_max``.
        cache_len: the length of the soft-punishment interval ``L_cache``, ``0 < cache_len <= max_len``.
        factor: the penalty at and beyond ``max_len`` (DAPO: 1.0).
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``[N]`` penalties in ``[-factor, 0]``, fp32 (fp64 for fp64 lengths).
    """
    check_tensor("lengths", lengths, ndim=1)
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"lengths must be integer or floating, got {lengths.dtype}")
    check_number("max_len", max_len, low=0, low_inclusive=False)
    check_number("cache_len", cache_len, low=0, low_inclusive=False)
    if cache_len > max_len:
        raise ValueError(f"cache_len must be <= max_len, got cache_len={cache_len} > max_len={max_len}")
    check_number("factor", factor, low=0)
    check_values(~(lengths < 0), "lengths must be non-negative, got a negative length")
    if lengths.dtype.is_floating_point:
        check_values(~torch.isnan(lengths), "lengths must not contain NaN")
    if resolve_backend(backend, lengths) == "triton" and lengths.dtype != torch.float64:
        from ._fused import soft_overlong_penalty_triton

        return soft_overlong_penalty_triton(lengths, max_len, cache_len, factor)
    return _soft_overlong_penalty_torch(lengths, max_len, cache_len, factor)
