"""``group=`` of ``rlloss.distributed``: a sub-group of the world, its ranks' counts and quantile only.

The other distributed tests use the default group (``group=None``), where a function that ignored its
``group`` and reduced over the world would pass. Here 2 gloo processes form the sub-group {1} (two
processes, the fewest that tell a group from the world); rank 0, outside it, holds a batch of its own.
Expected values are computed here from the batches (token and row counts summed by hand, the quantile by
``torch.quantile`` on the group's valid entropies), never by the code under test. What could fail: the
collective run over the world (rank 0's tokens counted), ``dp_size`` the world's size, the quantile over
the wrong ranks.
"""

from __future__ import annotations

import pytest
import torch

import rlloss
import rlloss.distributed
from helpers import gloo_rank, spawn_ranks

WORLD = 3
MEMBERS = [1, 2]  # two members, so a missing reduction shows; rank 0 outside, so the world's would too
SPAWN_TIMEOUT_S = 180.0
FRACTION = 0.3


def _batch(rank: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Two micro-batch masks (one with an empty row), entropies and their mask, different on every rank."""
    gen = torch.Generator().manual_seed(40 + rank)
    masks = [torch.rand(2 + rank, 5, generator=gen) < 0.6, torch.rand(3, 4, generator=gen) < 0.5]
    masks[0][0] = False
    entropy = torch.rand(3 + rank, 7, generator=gen) * 4
    return masks, entropy, torch.rand(3 + rank, 7, generator=gen) < 0.7


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    with gloo_rank(rank, port, out_dir, WORLD):
        group = dist.new_group(MEMBERS)  # every rank takes part in creating it
        result = {}
        if rank in MEMBERS:
            masks, entropy, mask = _batch(rank)
            counts = rlloss.distributed.step_counts(masks, group=group)
            rows = rlloss.distributed.step_counts(masks, group=group, count_empty_rows=False)
            result = {"counts": (int(counts.num_tokens), int(counts.num_seqs), counts.dp_size),
                      "nonempty_rows": int(rows.num_seqs),
                      "keep": rlloss.distributed.top_entropy_mask(entropy, mask, fraction=FRACTION, group=group)}
        torch.save(result, f"{out_dir}/rank{rank}.pt")


def test_a_sub_group_reduces_over_its_members_only(tmp_path):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    results = spawn_ranks(_rank_main, WORLD, tmp_path, SPAWN_TIMEOUT_S)
    batches = {r: _batch(r) for r in MEMBERS}
    tokens = sum(int(m.sum()) for r in MEMBERS for m in batches[r][0])
    seqs = sum(m.shape[0] for r in MEMBERS for m in batches[r][0])
    nonempty = sum(int(m.any(-1).sum()) for r in MEMBERS for m in batches[r][0])
    valid = torch.cat([batches[r][1][batches[r][2]] for r in MEMBERS])
    threshold = torch.quantile(valid, 1 - FRACTION)  # linear interpolation, as SPEC's quantile
    for r in MEMBERS:
        assert results[r]["counts"] == (tokens, seqs, len(MEMBERS))
        assert results[r]["nonempty_rows"] == nonempty < seqs
        _, entropy, mask = batches[r]
        assert torch.equal(results[r]["keep"], mask & (entropy >= threshold))
    kept = sum(int(results[r]["keep"].sum()) for r in MEMBERS)
    assert 0 < kept < valid.numel()
    # the world's quantile would differ: rank 0's batch moves it
    world = torch.cat([valid, _batch(0)[1][_batch(0)[2]]])
    assert torch.quantile(world, 1 - FRACTION) != threshold
