r"""``top_entropy_mask`` with its quantile taken over every rank (re-exported by ``rlloss.distributed``).

Kept in its own module so ``rlloss.distributed`` can import it; built on ``torch.distributed`` only
and usable without it (one process: the single-process ``rlloss.corrections.top_entropy_mask``).
"""

from __future__ import annotations

from typing import Any

import torch

from ._validate import compute_dtype
from .corrections import _check_top_entropy, _masked_quantile, _top_entropy_mask_torch

__all__ = ["top_entropy_mask"]


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, *, fraction: float, group: Any = None) -> torch.Tensor:
    r"""``rlloss.top_entropy_mask`` with the entropy quantile over the valid tokens of all ranks.

    Keeps this rank's valid tokens with ``entropy >= q``, where ``q`` is the ``1 - fraction``
    quantile (linear interpolation, as ``torch.quantile``) of the valid entropies of every rank
    of ``group`` together: the same mask as the single-process ``top_entropy_mask`` on the
    concatenated batch. This is TRL's ``get_high_entropy_mask`` (``top_entropy_quantile``),
    which pads and gathers the entropies across processes the same way.

    A collective: every rank of ``group`` must call it (a rank with no valid token still calls
    it, and gets all False unless another rank has tokens). Each rank sends its valid entropies
    only: first the counts (one ``all_gather`` of an int64 scalar), then the entropies padded to
    the largest count (one ``all_gather``), on the entropy's device, which must be one the
    group's backend handles (CUDA for NCCL, CPU or CUDA for gloo). Without an initialised
    process group it is the single-process function.

    Args:
        entropy: floating tensor of per-token entropies (usually ``[B, T]``; ``B`` and ``T`` may
            differ between ranks).
        mask: same shape, bool or numeric where non-zero means valid.
        fraction: in ``(0, 1]``, the share of all ranks' valid tokens to keep.
        group: the process group (None: the default group).

    Returns:
        bool tensor of ``entropy``'s shape.
    """
    mask = _check_top_entropy(entropy, mask, fraction)
    if not _dist_initialized():
        return _top_entropy_mask_torch(entropy, mask, fraction)
    dist = torch.distributed
    world = dist.get_world_size(group)
    e = entropy.detach().to(compute_dtype(entropy))
    local = e[mask]
    count = torch.tensor([local.numel()], dtype=torch.int64, device=e.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts_t = torch.cat(counts)
    longest = int(counts_t.max())
    if longest == 0:  # no rank has a valid token (every rank sees the same counts): nothing is kept
        return torch.zeros_like(mask)
    padded = torch.zeros(longest, dtype=e.dtype, device=e.device)
    padded[: local.numel()] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    values = torch.stack(gathered)  # [world, longest]
    valid = torch.arange(longest, device=e.device)[None, :] < counts_t[:, None]
    threshold = _masked_quantile(values, valid, 1.0 - fraction)
    return mask & (e >= threshold)
