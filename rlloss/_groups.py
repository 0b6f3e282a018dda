"""Group indexing shared by the group estimators, their references and their kernels (a leaf)."""

from __future__ import annotations

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
