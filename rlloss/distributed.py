r"""Global counts of one optimizer step, for exact objectives under gradient accumulation and DDP/FSDP.

A trainer splits one optimizer step into micro-batches (gradient accumulation) and ranks (data
parallelism); each call of ``policy_loss`` sees one micro-batch of one rank. Its default counts are
local, and normalising each micro-batch by its own token count optimises a mean of micro-batch
means: tokens in micro-batches with few tokens weigh more, by an amount that depends on how the
batch happened to be split. ``step_counts`` gives the counts of the whole step instead, with one
``all_reduce``; passed to ``policy_loss`` they make the sum of the micro-batch losses, averaged over
ranks as DDP and FSDP average gradients, exactly the full-batch objective.

Built on ``torch.distributed`` only, and usable without it: when no process group is initialised
(one process), the counts are those of this process and ``dp_size`` is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ._distributed_entropy import top_entropy_mask  # the quantile over all ranks (rlloss.corrections)
from ._validate import check_same_device, check_tensor, warn_if_empty

__all__ = ["StepCounts", "step_counts", "top_entropy_mask"]


class StepCounts(NamedTuple):
    """The counts of one optimizer step; unpacks as ``num_tokens, num_seqs, dp_size``.

    ``num_tokens`` and ``num_seqs`` are 0-d int64 tensors on the masks' device (exact counts, never
    read back to the host); ``dp_size`` is the number of data-parallel ranks. ``policy_loss(...,
    **counts.kwargs())`` passes all three.
    """

    num_tokens: torch.Tensor
    num_seqs: torch.Tensor
    dp_size: int

    def kwargs(self) -> dict[str, Any]:
        """``{"num_tokens": ..., "num_seqs": ..., "dp_size": ...}``, the keyword arguments of ``policy_loss``."""
        return {"num_tokens": self.num_tokens, "num_seqs": self.num_seqs, "dp_size": self.dp_size}


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def step_counts(
    masks: Sequence[torch.Tensor],
    *,
    group: Any = None,
    count_empty_rows: bool = True,
) -> StepCounts:
    r"""Token and sequence counts of one optimizer step, summed over micro-batches and ranks.

    For rank ``r`` of the data-parallel group holding micro-batch masks ``M^{r,k}`` (``[B_rk, T_rk]``):

    - ``num_tokens = sum_r sum_k sum_{i,t} M^{r,k}_{it}`` (non-zero entries are valid tokens);
    - ``num_seqs = sum_r sum_k B_rk``, every row counting as a sequence whether or not it holds a
      token: the ``N_seq = B`` default of ``policy_loss`` (and TRL's). With
      ``count_empty_rows=False`` only rows with at least one valid token count, as verl's seq-mean
      aggregations do;
    - ``dp_size`` = the size of ``group`` (``torch.distributed.get_world_size(group)``), or 1 when
      ``torch.distributed`` is not initialised.

    Why: with these counts every micro-batch loss ``L_rk`` is ``dp_size`` times its share of the
    full-batch objective ``L`` (for ``token_mean``, ``dp_size * sum(l*M^{r,k}) / num_tokens``), so
    ``(1/dp_size) * sum_r sum_k L_rk = L``: calling ``backward()`` on every micro-batch loss (no
    division by the number of micro-batches) and letting DDP or FSDP average gradients over the
    group gives exactly the full-batch gradient, however the batch is split. Normalising each
    micro-batch by its own counts instead optimises a mean of micro-batch means, a different
    objective whenever micro-batches are uneven.

    This is a collective: every rank of ``group`` must call it once per optimizer step, before the
    micro-batch losses, with the masks of all its micro-batches of that step (a rank with no data
    passes one ``[0, T]`` mask). The two counts travel in one ``all_reduce`` of a ``[2]`` int64
    tensor on the masks' device, which must be one the group's backend can reduce (CUDA for NCCL,
    CPU or CUDA for gloo). ``group`` must be the group that gradients are averaged over (the
    data-parallel group; ranks holding the same data, as in tensor parallelism, must not be in it).

    Args:
        masks: a list (or tuple) of 2-D masks ``[B_k, T_k]``, one per micro-batch of this rank's
            step, all on one device; bool, or numeric with non-zero meaning valid.
        group: the ``torch.distributed`` process group to reduce over; None for the default group.
            Ignored (must be None) when ``torch.distributed`` is not initialised.
        count_empty_rows: True (default) counts every row as a sequence; False only rows with a
            valid token.

    Returns:
        ``StepCounts(num_tokens, num_seqs, dp_size)``: two 0-d int64 tensors on the masks' device
        and an int. Unpack it, or pass ``**counts.kwargs()`` to ``policy_loss``.

    An empty step (``num_tokens == 0``: nothing to train on) issues an ``rlloss.EmptyBatchWarning``
    when the masks are on the CPU, where the count is read for free; on CUDA the count stays on
    the device (reading it would synchronise): check ``num_tokens`` where the trainer syncs anyway.

    Example::

        # one all_reduce
        counts = rlloss.distributed.step_counts([mask[s] for s in micro])
        for s in micro:
            loss, _ = rlloss.policy_loss(logp[s], old_logp[s], adv[s], mask[s],
                                         aggregation="token_mean", **counts.kwargs())
            loss.backward()  # sum over micro-batches; DDP/FSDP average over ranks
        optimizer.step()
    """
    if isinstance(masks, torch.Tensor):
        raise TypeError("masks must be a list of 2-D masks, one per micro-batch of the step, got a single "
                        "tensor (wrap one mask in a list: [mask])")
    if not isinstance(masks, (list, tuple)):
        raise TypeError(f"masks must be a list of 2-D masks, one per micro-batch of the step, got {type(masks).__name__}")
    if len(masks) == 0:
        raise ValueError("masks must hold the mask of at least one micro-batch, got an empty list "
                         "(a rank with no data passes one [0, T] mask: step_counts is a collective)")
    for k, m in enumerate(masks):
        check_tensor(f"masks[{k}]", m, ndim=2)
        if m.is_complex():
            raise TypeError(f"masks[{k}] must be bool or real numeric, got {m.dtype}")
    check_same_device(**{f"masks[{k}]": m for k, m in enumerate(masks)})
    if not isinstance(count_empty_rows, bool):
        raise TypeError(f"count_empty_rows must be a bool, got {type(count_empty_rows).__name__} {count_empty_rows!r}")
    initialized = _dist_initialized()
    if group is not None and not initialized:
        raise ValueError("group was given but torch.distributed is not initialised; pass group=None for one process")

    device = masks[0].device
    valid = [m if m.dtype == torch.bool else m != 0 for m in masks]
    tokens = torch.stack([v.sum(dtype=torch.int64) for v in valid]).sum()
    if count_empty_rows:
        seqs = torch.tensor(sum(v.shape[0] for v in valid), dtype=torch.int64, device=device)
    else:
        seqs = torch.stack([v.any(dim=-1).sum(dtype=torch.int64) for v in valid]).sum()
    counts = torch.stack([tokens, seqs])

    dp_size = 1
    if initialized:
        dist = torch.distributed
        dp_size = dist.get_world_size(group)
        if dp_size < 1:
            raise ValueError("this process is not a member of group; every rank that calls step_counts must be")
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    num_tokens, num_seqs = counts.unbind()
    warn_if_empty(num_tokens, "step_counts: no valid token in the whole step (every mask all False, on every rank: "
                              "did a filter drop every response?); its losses are 0 and nothing is trained on")
    return StepCounts(num_tokens, num_seqs, dp_size)
