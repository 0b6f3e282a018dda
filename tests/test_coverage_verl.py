"""verl config fields the integration reads that no other test set away from their defaults, against verl itself.

Same method as ``tests/test_integrations_verl.py`` (whose batch and ``ppo_loss`` driver this module
imports): verl's own loss (``loss_mode=<verl's>``) against ``rlloss_<name>`` through ``ppo_loss``, loss and
gradient. The fields: ``clip_ratio`` alone (``clip_ratio_low``/``clip_ratio_high`` unset, so both fall back
to it, in verl and in ``_clip_range``), and Clip-Cov's upper covariance bound ``clip_cov_ub`` below the
largest covariance of the batch (so that it decides which tokens are cut). What could fail: the fallback
read from rlloss's default 0.2 instead of the config, ``clip_cov_ub`` ignored.
"""

from __future__ import annotations

import pytest

import test_integrations_verl as base
from helpers import require_trainer

pytestmark = pytest.mark.trainers


@pytest.fixture(autouse=True)
def _verl_installed():
    require_trainer(base.VERL_MISSING)


# rlloss name -> (verl loss_mode, ActorConfig fields, PolicyLossConfig fields), as base.PAIRS
PAIRS = {
    "ppo": ("vanilla", dict(clip_ratio=0.1, clip_ratio_low=None, clip_ratio_high=None), {}),
    "cispo": ("cispo", dict(clip_ratio=0.15, clip_ratio_low=None, clip_ratio_high=None), {}),
    # ratio 1: every candidate is cut (verl draws them with torch.randperm, rlloss with its own seed)
    "clip_cov": ("clip_cov", dict(clip_ratio_low=0.2, clip_ratio_high=0.2), dict(clip_cov_ratio=1.0, clip_cov_lb=0.0,
                                                                               clip_cov_ub=0.05)),
}


@pytest.mark.parametrize("info", [base.LOCAL, base.GLOBAL], ids=["local", "global"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_policy_loss_matches_verl(name, info):
    verl_mode, actor, policy = PAIRS[name]
    want = base.run_ppo_loss(verl_mode, "token-mean", info, actor=actor, policy=policy, is_weights=True)
    got = base.run_ppo_loss(base.rv.PREFIX + name, "token-mean", info, actor=actor, policy=policy, is_weights=True)
    base.assert_same(got, want)
    assert want[1].abs().max() > 0 and want[0] != 0


@pytest.mark.parametrize("name, default", [("ppo", dict(clip_ratio_low=0.2, clip_ratio_high=0.2)),
                                           ("clip_cov", dict(clip_cov_ub=5.0))])
def test_the_fields_change_verls_loss(name, default):
    """The cases above are not vacuous: at the fields' defaults verl's own loss is another."""
    verl_mode, actor, policy = PAIRS[name]
    set_ = base.run_ppo_loss(verl_mode, "token-mean", base.LOCAL, actor=actor, policy=policy)
    actor_default = {**actor, **{k: v for k, v in default.items() if k.startswith("clip_ratio")}}
    policy_default = {**policy, **{k: v for k, v in default.items() if k.startswith("clip_cov")}}
    unset = base.run_ppo_loss(verl_mode, "token-mean", base.LOCAL, actor=actor_default, policy=policy_default)
    assert not (set_[0] == unset[0] and bool((set_[1] == unset[1]).all()))
