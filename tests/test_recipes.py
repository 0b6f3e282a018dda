"""The presets hold the published values (SPEC's recipe table) and call the functions with them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import rlloss
from helpers import DEVICE
from strategies import make_problem

# (recipe, eps_low, eps_high, aggregation, beta, scale, level), as the papers publish them.
PUBLISHED = [
    (rlloss.GRPO, 0.2, 0.2, "seq_mean_token_mean", 0.04, "group", "token"),
    (rlloss.DAPO, 0.2, 0.28, "token_mean", 0.0, "group", "token"),
    (rlloss.DR_GRPO, 0.2, 0.2, "constant", 0.0, "none", "token"),
    (rlloss.GSPO, 3e-4, 4e-4, "seq_mean_token_mean", 0.0, "group", "sequence"),
]


@pytest.mark.parametrize("recipe, eps_low, eps_high, aggregation, beta, scale, level", PUBLISHED)
def test_preset_values(recipe, eps_low, eps_high, aggregation, beta, scale, level):
    assert (recipe.eps_low, recipe.eps_high, recipe.aggregation, recipe.beta, recipe.scale, recipe.level) == (
        eps_low, eps_high, aggregation, beta, scale, level)
    assert recipe.baseline == "mean"


def test_dapo_extras():
    assert rlloss.DAPO.dynamic_sampling and rlloss.DAPO.overlong_filter
    got = rlloss.DAPO.overlong_penalty(torch.tensor([16384, 18432, 30000], device=DEVICE))
    torch.testing.assert_close(got, torch.tensor([0.0, -0.5, -1.0], device=DEVICE))
    with pytest.raises(ValueError, match="overlong"):
        rlloss.GRPO.overlong_penalty(torch.tensor([1]))


@pytest.mark.parametrize("recipe", [r[0] for r in PUBLISHED])
def test_preset_loss_is_policy_loss_with_its_values(recipe):
    p = make_problem(3, 17, torch.float32, seed=7, spread=0.3)
    extra = {"max_tokens": 32} if recipe.aggregation == "constant" else {}
    got = recipe.loss(p.logp, p.old_logp, p.adv, p.mask, ref_logp=p.ref_logp, **extra)
    want = rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask, ref_logp=p.ref_logp, eps_low=recipe.eps_low,
                              eps_high=recipe.eps_high, aggregation=recipe.aggregation, beta=recipe.beta,
                              level=recipe.level, **extra)
    assert torch.equal(got.loss, want.loss)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], device=DEVICE)
    assert torch.equal(recipe.advantages(rewards, group_size=3),
                       rlloss.group_advantages(rewards, group_size=3, baseline="mean", scale=recipe.scale))


def test_overrides_win_and_presets_are_frozen():
    p = make_problem(2, 5, torch.float32, seed=1)
    a = rlloss.DAPO.loss(p.logp, p.old_logp, p.adv, p.mask, eps_high=0.2)
    b = rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask, eps_high=0.2, aggregation="token_mean")
    assert torch.equal(a.loss, b.loss)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rlloss.GRPO.beta = 0.0  # type: ignore[misc]


def test_result_indexing_gives_the_loss():
    p = make_problem(2, 5, torch.float32, seed=1)
    out = rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask)
    assert out[0] is out.loss and set(out.metrics) == {"clip_low", "clip_high", "clip_dual", "ratio_mean",
                                                         "num_tokens", "nonfinite_inputs", "positive_logp"}


def test_presets_beyond_ppo_hold_their_papers_values():
    from rlloss.recipes import CISPO_RECIPE, DPPO_RECIPE, GMPO_RECIPE, LUSPO, SAPO_RECIPE

    assert CISPO_RECIPE.objective == rlloss.CISPO(low=None, high=5.0)
    assert SAPO_RECIPE.objective == rlloss.SAPO(tau_pos=1.0, tau_neg=1.05)
    assert GMPO_RECIPE.objective == rlloss.GMPO(log_clip_low=0.4, log_clip_high=0.4)
    assert GMPO_RECIPE.aggregation == "seq_mean_token_mean"
    assert DPPO_RECIPE.objective == rlloss.DPPO(divergence="tv", low=0.2, high=0.2, weight_cap=3.0)
    assert (LUSPO.level, LUSPO.aggregation, LUSPO.eps_low, LUSPO.eps_high) == ("sequence", "seq_mean_token_sum",
                                                                              3e-4, 4e-4)
    p = make_problem(3, 11, torch.float32, seed=2, spread=0.2)
    for recipe in (CISPO_RECIPE, SAPO_RECIPE, GMPO_RECIPE, DPPO_RECIPE):
        got = recipe.loss(p.logp, p.old_logp, p.adv, p.mask)
        want = rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask, objective=recipe.objective,
                                  aggregation=recipe.aggregation)
        assert torch.equal(got.loss, want.loss), recipe.name
