"""The small public functions on every backend, GDPO's ``eps`` and the loss from logits at a temperature, by hand.

``backend=`` of ``k3_kl``, ``kl_estimate``, ``masked_mean``, ``soft_overlong_penalty`` and
``dynamic_sampling_mask`` was checked against hand values only on the default backend (``"auto"``, the
reference on a CPU), the kernels against the reference; ``dynamic_sampling_mask``'s ``groups=`` (shuffled ids)
only against the reference; GDPO's ``eps`` never away from its default; ``policy_loss_from_logits``'
temperature only against the reference of the same function. Here each expected value is worked out from
SPEC's formula (or, from logits, computed by float64 ``log_softmax`` and the float64 loss of
``tests/test_oracles.py``). What could fail: a kernel path that differs from the formula where the reference
agrees with it, ids read as contiguous groups, ``eps`` not reaching the group std, the temperature applied
twice or not at all.
"""

from __future__ import annotations

import math

import pytest
import torch

import rlloss
import test_oracles as oracles
from helpers import BACKENDS, DEVICE, assert_close

F64 = torch.float64


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_helpers_on_every_backend_by_hand(backend):
    logp, ref = t([[-1.0, -2.0, -0.5]]), t([[-1.5, -1.0, -0.5]])
    x = [-0.5, 1.0, 0.0]  # ref - logp
    k3 = [math.exp(v) - v - 1 for v in x]
    torch.testing.assert_close(rlloss.k3_kl(logp, ref, backend=backend).cpu(), torch.tensor([k3]))
    torch.testing.assert_close(rlloss.kl_estimate(logp, ref, kind="k2", backend=backend).cpu(),
                               torch.tensor([[v * v / 2 for v in x]]))
    values = t([[1.0, 2.0, 4.0], [3.0, 5.0, 7.0]])
    mask = torch.tensor([[True, False, True], [False, True, True]], device=DEVICE)
    torch.testing.assert_close(rlloss.masked_mean(values, mask, backend=backend).cpu(), torch.tensor(17 / 4))
    torch.testing.assert_close(rlloss.masked_mean(values, mask, normalizer=10, backend=backend).cpu(),
                               torch.tensor(1.7))
    # free up to 20 - 8 = 12, then (12 - L) / 8, -1 past 20; factor 2 doubles every piece
    lengths = torch.tensor([3, 12, 14, 20, 25], device=DEVICE)
    torch.testing.assert_close(
        rlloss.soft_overlong_penalty(lengths, max_len=20, cache_len=8, factor=2.0, backend=backend).cpu(),
        torch.tensor([0.0, 0.0, -0.5, -2.0, -2.0]))
    # groups by id, in any order: 7 mixed (kept), 2 all equal, 5 alone (dropped)
    rewards = t([1.0, 0.0, 0.5, 0.5, 3.0, 0.0, 0.5])
    ids = torch.tensor([7, 7, 2, 2, 5, 7, 2], device=DEVICE)
    assert rlloss.dynamic_sampling_mask(rewards, groups=ids, backend=backend).tolist() == [
        True, True, False, False, False, True, False]


def test_gdpo_eps_by_hand():
    """Two groups of two, two rewards with weights 1 and 0.5, ``eps=0.5``: the eps changes each reward's share
    before the whitening (which keeps only the ratio of the row values)."""
    eps = 0.5
    # group 0: reward 0 [1, 0] -> +-0.5/(sqrt(.5)+eps); reward 1 [0, 2] -> -+1/(sqrt(2)+eps), weight 0.5
    v = 0.5 / (math.sqrt(0.5) + eps) - 0.5 * 1 / (math.sqrt(2) + eps)
    # group 1: reward 0 [3, 1] -> +-1/(sqrt(2)+eps); reward 1 [1, 1] -> 0
    u = 1 / (math.sqrt(2) + eps)
    s = math.sqrt((2 * v * v + 2 * u * u) / 3 + 1e-8)  # whiten: mean 0, unbiased variance
    scores = t([[1.0, 0.0, 3.0, 1.0], [0.0, 2.0, 1.0, 1.0]], F64)
    mask = torch.ones(4, 1, dtype=torch.bool, device=DEVICE)
    got = rlloss.gdpo_advantages(scores, mask=mask, group_size=2, weights=[1.0, 0.5], eps=eps)
    torch.testing.assert_close(got.cpu(), torch.tensor([[v / s], [-v / s], [u / s], [-u / s]], dtype=F64),
                               rtol=1e-12, atol=1e-12)
    default = rlloss.gdpo_advantages(scores, mask=mask, group_size=2, weights=[1.0, 0.5])
    assert not torch.allclose(default, got)  # at 1e-6 the ratio v/u differs


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_from_logits_matches_float64_log_softmax(backend):
    """At ``temperature=0.7`` with ``entropy_coef=0.05``: the oracle's PPO token mean of the float64
    log-probs of ``logits / 0.7``, minus 0.05 times the mean entropy of the valid tokens; value and the
    gradient in the logits (autograd through float64 ``log_softmax``)."""
    b, n, v, temperature, coef = 3, 6, 11, 0.7, 0.05
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(b, n, v, generator=gen, dtype=F64) * 2).float().double()  # fp32-exact values
    ids = torch.randint(0, v, (b, n), generator=gen)
    mask = torch.rand(b, n, generator=gen) < 0.7
    mask[1] = False  # an empty row
    leaf = logits.clone().requires_grad_(True)
    log_probs = torch.log_softmax(leaf / temperature, -1)
    lp = log_probs.gather(-1, ids[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    old = (lp.detach() + 0.4 * torch.randn(b, n, generator=gen, dtype=F64)).float().double()
    adv = torch.randn(b, generator=gen, dtype=F64).float().double()
    pb = oracles.Problem(lp.detach(), old, lp.detach(), adv, mask)
    mods = {"aggregation": "token_mean", "beta": 0.0, "kl": "k3", "kl_bias_correction": False, "num_tokens": None,
            "num_seqs": None, "max_tokens": 9, "dp_size": 1}
    binds = oracles.Binds()
    expected = oracles.oracle_loss(pb, lp, "ppo", {"eps_low": 0.2}, mods, None, binds) - coef * entropy[mask].mean()
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    assert binds.count > 0  # the clip binds somewhere
    dtype = F64 if backend == "torch" else torch.float32
    x = logits.to(device=DEVICE, dtype=dtype).requires_grad_(True)
    out = rlloss.policy_loss_from_logits(x, torch.where(mask, ids, -100).to(DEVICE), old.to(DEVICE, dtype),
                                         adv.to(DEVICE, dtype), mask.to(DEVICE), temperature=temperature,
                                         entropy_coef=coef, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, x)
    scale = 0.0 if backend == "torch" else float(logits.abs().max()) / temperature
    assert_close(out.loss.detach().double().cpu(), expected.detach(), dtype, scale=scale, what="loss")
    assert_close(grad.double().cpu(), expected_grad, dtype, scale=scale, what="gradient in the logits")
    assert bool((grad[~mask.to(DEVICE)] == 0).all())
