"""Group indexing shared by the group estimators, their references and their kernels (a leaf)."""

from __future__ import annotations

import math

import torch


def group_index(groups: int | torch.Tensor, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Dense group index ``[n]`` in ``0..K-1`` and the number of groups ``K``.

    An int group size means contiguous groups (TRL's layout); a tensor holds arbitrary group ids
    (verl's ``index``), renumbered here in order of first sorted id.
    """
    if isinstance(groups, int):
        return torch.arange(n, device=device) // groups, n // groups
    uniq, inverse = torch.unique(groups, return_inverse=True)
    return inverse, int(uniq.numel())


def group_sum(x: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group sum over the first dimension: ``[k, ...]``."""
    return torch.zeros((k, *x.shape[1:]), dtype=x.dtype, device=x.device).index_add(0, index, x)


def group_amax(x: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group max of ``x`` ``[N]`` (``-inf`` for a group with no member)."""
    init = torch.full((k,), -math.inf, dtype=x.dtype, device=x.device)
    return init.scatter_reduce(0, index, x, reduce="amax", include_self=True)
