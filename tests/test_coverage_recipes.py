"""A ``Recipe`` built with every field away from its default, and the presets' methods with each of their keywords,
against values worked by hand and the float64 oracle of ``tests/test_oracles.py``.

``tests/test_recipes.py`` checks the published presets and that their methods call the functions with the
presets' values (the expected value there is the function itself); here the expected values are independent:
advantages written out per group from SPEC (leave-one-out baseline, no scale), the loss of the oracle's
GSPO or CISPO with the recipe's clip, KL and aggregation, DAPO's overlong penalty at hand-picked lengths.
What could fail: a field not passed on (``level``, ``beta``, ``baseline``, ...), an override that loses to the
preset, the two grouping keywords of ``advantages`` not reaching ``group_advantages``, the lengths of
``overlong_penalty`` read from another field; and the two flags that only record the paper's batch filters
(``dynamic_sampling``, ``overlong_filter``) changing a number they must not change.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import rlloss
import test_oracles as oracles
from helpers import DEVICE, assert_close

F64 = torch.float64

# Every field differs from Recipe's default (the two lengths and the flags included).
CUSTOM = rlloss.Recipe(name="custom", paper="a test", baseline="loo", scale="none", eps_low=0.05, eps_high=0.08,
                       aggregation="seq_mean_token_sum", beta=0.3, level="sequence", dynamic_sampling=True,
                       overlong_filter=True, overlong_max_len=100, overlong_cache_len=20)
CUSTOM_CISPO = rlloss.Recipe(name="custom-cispo", paper="a test", aggregation="token_mean", beta=0.04,
                             objective=rlloss.CISPO(low=0.8, high=1.3))
REWARDS = [1.0, 0.0, 3.0, 2.0, 2.0, 5.0, 1.0]
IDS = [2, 0, 2, 0, 0, 7, 2]  # groups {1, 3, 4}, {0, 2, 6}, and a singleton (row 5)


def leave_one_out(rewards: list[float], ids: list[int]) -> list[float]:
    """SPEC's RLOO advantage, no scale: the reward minus the mean of the others in its group; 0 alone."""
    out = []
    for i, r in enumerate(rewards):
        others = [rewards[j] for j in range(len(ids)) if ids[j] == ids[i] and j != i]
        out.append(r - sum(others) / len(others) if others else 0.0)
    return out


def test_custom_recipe_advantages_by_hand():
    """``groups=`` (shuffled ids) and ``group_size=`` (contiguous), with the recipe's baseline and scale."""
    rewards = torch.tensor(REWARDS, dtype=F64, device=DEVICE)
    got = CUSTOM.advantages(rewards, groups=torch.tensor(IDS, device=DEVICE))
    want = leave_one_out(REWARDS, IDS)
    assert want[:3] == [1.0 - 2.0, 0.0 - 2.0, 3.0 - 1.0]  # the oracle itself, at a glance
    torch.testing.assert_close(got.cpu(), torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-12)
    contiguous = CUSTOM.advantages(rewards[:6], group_size=3)
    torch.testing.assert_close(contiguous.cpu(), torch.tensor(leave_one_out(REWARDS[:6], [0, 0, 0, 1, 1, 1]),
                                                              dtype=F64), rtol=1e-12, atol=1e-12)
    # an override wins over the preset's scale: the group's unbiased std divides
    overridden = CUSTOM.advantages(rewards[:3], group_size=3, scale="group", eps=0.5)
    std = torch.tensor(REWARDS[:3], dtype=F64).std().item()
    torch.testing.assert_close(overridden.cpu(),
                               torch.tensor(leave_one_out(REWARDS[:3], [0, 0, 0]), dtype=F64) / (std + 0.5),
                               rtol=1e-12, atol=1e-12)


def _mods(recipe: rlloss.Recipe, **extra) -> dict:
    return {"aggregation": recipe.aggregation, "beta": recipe.beta, "kl": "k3", "kl_bias_correction": False,
            "num_tokens": None, "num_seqs": None, "max_tokens": 9, "dp_size": 1, **extra}


@pytest.mark.parametrize("recipe, name, params", [
    (CUSTOM, "gspo", dict(eps_low=0.05, eps_high=0.08)),
    (CUSTOM_CISPO, "cispo", dict(low=0.8, high=1.3)),
])
def test_custom_recipe_loss_matches_the_oracle(recipe, name, params):
    """The recipe's clip (or objective), level, KL coefficient and aggregation, against the oracle's loss."""
    pb = oracles.make_problem(4, 4, 8, per_token_adv=False, row_regions=name == "gspo")
    leaf = pb.logp.clone().requires_grad_(True)
    binds = oracles.Binds()
    expected = oracles.oracle_loss(pb, leaf, name, params, _mods(recipe), None, binds)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    assert binds.count > 0
    x = pb.logp.to(DEVICE).requires_grad_(True)
    out = recipe.loss(x, pb.old.to(DEVICE), pb.adv.to(DEVICE), pb.mask.to(DEVICE), ref_logp=pb.ref.to(DEVICE),
                      backend="torch")
    (grad,) = torch.autograd.grad(out.loss, x)
    assert_close(out.loss.detach().cpu(), expected.detach(), F64, what=f"{recipe.name} loss")
    assert_close(grad.cpu(), expected_grad, F64, what=f"{recipe.name} gradient")


def test_custom_recipe_overrides_win_in_the_loss():
    """``num_seqs`` and ``dp_size`` given to ``loss`` reach the aggregation; ``beta`` overrides the recipe's."""
    pb = oracles.make_problem(6, 3, 5, per_token_adv=False, row_regions=True)
    leaf = pb.logp.clone().requires_grad_(True)
    expected = oracles.oracle_loss(pb, leaf, "gspo", dict(eps_low=0.05, eps_high=0.08),
                                   _mods(CUSTOM, beta=0.0, num_seqs=7.5, dp_size=2), None, oracles.Binds())
    out = CUSTOM.loss(pb.logp.to(DEVICE), pb.old.to(DEVICE), pb.adv.to(DEVICE), pb.mask.to(DEVICE), beta=0.0,
                      num_seqs=7.5, dp_size=2, backend="torch")
    assert_close(out.loss.cpu(), expected.detach(), F64, what="overridden loss")


def test_custom_recipe_overlong_penalty_by_hand():
    """DAPO's three pieces at the recipe's lengths: 0 up to 100 - 20, then -(L - 80) / 20, then -1 past 100."""
    lengths = torch.tensor([50, 80, 90, 100, 130], device=DEVICE)
    torch.testing.assert_close(CUSTOM.overlong_penalty(lengths).cpu(), torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    # an override of one length keeps the other: 0 up to 60, then -(L - 60) / 40
    torch.testing.assert_close(CUSTOM.overlong_penalty(lengths, cache_len=40).cpu(),
                               torch.tensor([0.0, -0.5, -0.75, -1.0, -1.0]))


def test_the_batch_filter_flags_change_no_number():
    """``dynamic_sampling`` and ``overlong_filter`` record the paper's filters (applied by the caller): the
    recipe without them gives bitwise the same advantages and loss."""
    plain = dataclasses.replace(CUSTOM, dynamic_sampling=False, overlong_filter=False)
    assert (CUSTOM.dynamic_sampling, CUSTOM.overlong_filter) == (True, True)
    rewards = torch.tensor(REWARDS, dtype=F64, device=DEVICE)
    ids = torch.tensor(IDS, device=DEVICE)
    assert torch.equal(CUSTOM.advantages(rewards, ids), plain.advantages(rewards, ids))
    pb = oracles.make_problem(2, 3, 5, per_token_adv=False)
    args = (pb.logp.to(DEVICE), pb.old.to(DEVICE), pb.adv.to(DEVICE), pb.mask.to(DEVICE))
    assert torch.equal(CUSTOM.loss(*args, ref_logp=pb.ref.to(DEVICE)).loss,
                       plain.loss(*args, ref_logp=pb.ref.to(DEVICE)).loss)
