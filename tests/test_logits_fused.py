"""The Triton path from logits: entropy against fp64 at large logits, the id check, and masked
positions that are never read.

Equivalence with the reference over drawn shapes is in ``tests/test_logits.py``; launches and bytes
in ``tests/test_traffic.py``.
"""

from __future__ import annotations

import pytest
import torch

import rlloss

# entropy of the Triton path against an fp64 computation on the same fp32 logits
ENTROPY_RTOL, ENTROPY_ATOL = 1e-5, 1e-6


def _fp64_reference(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(logits.double(), -1)
    return lp.gather(-1, ids[..., None])[..., 0], -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("center", [1e4, -1e4, 0.0])
@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])
def test_entropy_matches_fp64_even_for_logits_near_1e4(center, scale):
    gen = torch.Generator().manual_seed(int(scale * 10) + (center > 0))
    logits = center + scale * torch.randn(3, 5, 3000, generator=gen)
    logits[0, 0, 17] += 40.0  # a peaked row: p > 1 - 1e-6
    ids = torch.randint(0, 3000, (3, 5), generator=gen)
    logp, entropy = rlloss.token_logprobs(logits, ids, return_entropy=True, backend="triton")
    logp64, entropy64 = _fp64_reference(logits, ids)
    err = (entropy.double() - entropy64).abs()
    assert bool((err <= ENTROPY_ATOL + ENTROPY_RTOL * entropy64.abs()).all()), f"max error {float(err.max()):.3g}"
    assert bool((entropy >= 0).all())
    assert bool((logp <= 0).all())
    torch.testing.assert_close(logp.double(), logp64, rtol=1e-6, atol=2e-6)


def test_entropy_mean_of_the_fused_loss_matches_fp64_near_1e4():
    gen = torch.Generator().manual_seed(3)
    logits = -1e4 + torch.randn(2, 6, 1000, generator=gen)
    ids = torch.randint(0, 1000, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.bool)
    out = rlloss.policy_loss_from_logits(logits, ids, None, torch.ones(2), mask, backend="triton")
    _, entropy64 = _fp64_reference(logits, ids)
    expected = entropy64.mean()
    assert abs(float(out.metrics["entropy_mean"]) - float(expected)) <= ENTROPY_ATOL + ENTROPY_RTOL * float(expected)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bad", [11, -1, -100])
def test_an_id_outside_the_vocabulary_at_a_valid_position_raises(backend, bad):
    # a ValueError naming ids on the CPU (on CUDA a device-side assert, no sync), never a NaN loss; the same
    # id where masked is never read
    logits = torch.randn(2, 3, 11)
    ids = torch.randint(0, 11, (2, 3))
    ids[1, 2] = bad
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 11\)"):
        rlloss.policy_loss_from_logits(logits, ids, None, torch.ones(2), mask, backend=backend)
    mask[1, 2] = False
    out = rlloss.policy_loss_from_logits(logits, ids, None, torch.ones(2), mask, backend=backend)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("inplace", [False, True])
def test_masked_positions_are_never_read(inplace):
    """NaN logits and an id of -100 at masked positions change nothing, the gradient there is 0."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 19, generator=gen)
    ids = torch.randint(0, 19, (3, 4), generator=gen)
    mask = torch.rand(3, 4, generator=gen) > 0.4
    mask[0] = False
    old, adv = -torch.rand(3, 4, generator=gen), torch.randn(3, generator=gen)
    poisoned = torch.where(mask[..., None], logits, torch.full_like(logits, float("nan")))
    results = []
    for x, i in ((logits, ids), (poisoned, torch.where(mask, ids, torch.full_like(ids, -100)))):
        leaf = x.clone().requires_grad_(True)
        y = leaf * 1.0 if inplace else leaf  # in place needs a non-leaf buffer nothing else reads
        out = rlloss.policy_loss_from_logits(y, i, old, adv, mask, entropy_coef=0.05, beta=0.0,
                                             inplace_backward=inplace, backend="triton")
        out.loss.backward()
        results.append((out.loss.detach(), out.metrics["entropy_mean"], leaf.grad))
    (l0, h0, g0), (l1, h1, g1) = results
    assert torch.equal(l0, l1) and torch.equal(h0, h1)
    assert torch.equal(g0, g1)
    assert bool((g1[~mask] == 0).all())
