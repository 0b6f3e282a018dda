"""rlloss.integrations.verl against verl's own losses and estimators, through verl's own entry points.

Policy losses run through ``verl.workers.utils.losses.ppo_loss`` (the function verl's actor
calls), once with ``loss_mode=<verl's loss>`` and once with ``loss_mode=rlloss_<name>``, on the
same micro-batch, for every ``loss_agg_mode``, without and with ``global_batch_info`` (dp_size,
global token and sequence counts), with and without rollout IS weights; loss and gradient are
compared. Estimators run through ``ray_trainer.compute_advantage`` / ``get_adv_estimator_fn``.
What could fail: a wrong normaliser per mode, the non-empty-row count of verl's seq-mean modes,
``loss_scale_factor``, a misread config field (clip_ratio_low/high/c, tau, dro_beta, cov options),
KL or entropy added twice (verl adds them itself), singletons and uid grouping in the estimators,
re-registration raising, and the ``verl.plugins`` entry point not being declared.
"""

import importlib
import importlib.metadata
import subprocess
import sys

import numpy as np
import pytest
import torch

import rlloss
from helpers import require_trainer

# Deselected by default (pyproject: -m "not trainers"); `python -m pytest -m trainers` runs them where verl is
# installed at its tested version, and under CI=true a missing verl fails every test here, never skips it.
pytestmark = pytest.mark.trainers
try:
    from tensordict import TensorDict
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo import core_algos
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import ActorConfig, PolicyLossConfig
    from verl.workers.utils.losses import ppo_loss

    import rlloss.integrations.verl as rv
except ImportError as exc:  # this module still imports, so that the default run deselects its tests
    VERL_MISSING: ImportError | None = exc
else:
    VERL_MISSING = None


@pytest.fixture(autouse=True)
def _verl_installed():
    require_trainer(VERL_MISSING)


B, P, R = 6, 3, 7
LENGTHS = torch.tensor([7, 2, 0, 5, 1, 7])  # an empty row
MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
GLOBAL = {"dp_size": 2, "batch_num_tokens": 41, "global_batch_size": 13}
LOCAL = {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None}

# rlloss name -> (verl loss_mode, ActorConfig fields, PolicyLossConfig fields)
PAIRS = {
    "ppo": ("vanilla", dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.0), {}),
    "gspo": ("gspo", dict(clip_ratio_low=0.05, clip_ratio_high=0.08), {}),
    "cispo": ("cispo", dict(clip_ratio_low=0.3, clip_ratio_high=0.2), {}),
    "sapo": ("sapo", dict(tau_pos=0.9, tau_neg=1.4), {}),
    "reinforce": ("gpg", {}, {}),
    "dppo_tv": ("dppo_tv", dict(clip_ratio_low=0.05, clip_ratio_high=0.1, clip_ratio_c=1.5), {}),
    "dppo_kl": ("dppo_kl", dict(clip_ratio_low=0.01, clip_ratio_high=0.02, clip_ratio_c=1.5), {}),
    "kl_cov": ("kl_cov", {}, dict(kl_cov_ratio=0.2, ppo_kl_coef=0.5)),
    # every candidate token is cut (ratio 1): verl draws them with torch.randperm, rlloss with its own seed
    "clip_cov": ("clip_cov", dict(clip_ratio_low=0.2, clip_ratio_high=0.2), dict(clip_cov_ratio=1.0, clip_cov_lb=0.0,
                                                                               clip_cov_ub=5.0)),
    "dro": ("dro", {}, dict(dro_beta=0.3)),
}


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(R)[None] < LENGTHS[:, None]
    logp = -torch.rand(B, R, generator=g) * 2 - 0.05
    old = logp + 0.5 * torch.randn(B, R, generator=g)
    old[0, :3] = logp[0, :3] - 1.5  # ratios above the dual clip where A < 0
    adv = torch.tensor([-1.2, 0.8, 0.3, -0.5, 1.1, 0.6])[:, None].expand(B, R).contiguous()
    weights = torch.rand(B, R, generator=g) + 0.5
    ref = logp + 0.3 * torch.randn(B, R, generator=g)
    entropy = torch.rand(B, R, generator=g)
    return mask, logp, old, adv, weights, ref, entropy


def run_ppo_loss(loss_mode, mode, info, *, actor=None, policy=None, is_weights=False, kl=False, entropy=False):
    """verl's ppo_loss on one padded micro-batch; returns the loss and its gradient in the log-probs."""
    mask, logp, old, adv, weights, ref, ent = batch()
    config = ActorConfig(strategy="fsdp", rollout_n=1, use_dynamic_bsz=True, loss_agg_mode=mode,
                         use_kl_loss=kl, kl_loss_coef=0.1, entropy_coeff=0.01 if entropy else 0.0,
                         policy_loss=PolicyLossConfig(loss_mode=loss_mode, **(policy or {})), **(actor or {}))
    leaf = logp.clone().requires_grad_()
    # verl's no-padding layout: each row's prompt then response, the response log-probs shifted by one
    flat = torch.cat([torch.cat([torch.zeros(P - 1), leaf[i, :LENGTHS[i]], torch.zeros(1)]) for i in range(B)])
    fields = {"prompts": torch.ones(B, P, dtype=torch.long), "responses": torch.ones(B, R, dtype=torch.long),
              "attention_mask": torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], 1),
              "response_mask": mask.long(), "old_log_probs": old, "advantages": adv}
    if is_weights:
        fields["rollout_is_weights"] = weights
    if kl:
        fields["ref_log_prob"] = ref
    data = TensorDict(fields, batch_size=[B])
    for key, value in info.items():
        tu.assign_non_tensor_data(data, key, value)
    output = {"log_probs": flat}
    if entropy:
        output["entropy"] = torch.cat([torch.cat([torch.zeros(P - 1), ent[i, :LENGTHS[i]], torch.zeros(1)])
                                       for i in range(B)])
    loss, metrics = ppo_loss(config, output, data)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("is_weights", [False, True], ids=["no-is", "is-weights"])
@pytest.mark.parametrize("info", [LOCAL, GLOBAL], ids=["local", "global"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(PAIRS))
def test_policy_loss_matches_verl(name, mode, info, is_weights):
    verl_mode, actor, policy = PAIRS[name]
    want = run_ppo_loss(verl_mode, mode, info, actor=actor, policy=policy, is_weights=is_weights)
    got = run_ppo_loss(rv.PREFIX + name, mode, info, actor=actor, policy=policy, is_weights=is_weights)
    assert_same(got, want)
    assert want[1].abs().max() > 0 and want[0] != 0


@pytest.mark.parametrize("info", [LOCAL, GLOBAL], ids=["local", "global"])
@pytest.mark.parametrize("name", ["ppo", "cispo", "dro"])
def test_loss_scale_factor_matches_verl(name, info):
    """ActorConfig.loss_scale_factor (seq-mean-token-sum-norm's constant, instead of the padded length R = 7), with
    local and global counts, verl's KL and entropy terms on top: verl's loss and gradient."""
    verl_mode, actor, policy = PAIRS[name]
    actor = {**actor, "loss_scale_factor": 16}
    mode = "seq-mean-token-sum-norm"
    want = run_ppo_loss(verl_mode, mode, info, actor=actor, policy=policy, kl=True, entropy=True)
    got = run_ppo_loss(rv.PREFIX + name, mode, info, actor=actor, policy=policy, kl=True, entropy=True)
    assert_same(got, want)
    padded = run_ppo_loss(verl_mode, mode, info, actor=PAIRS[name][1], policy=policy, kl=True, entropy=True)
    assert not torch.allclose(padded[1], want[1])  # the factor changes the gradient: this case tests it


def test_ppo_metrics_match_verl():
    verl_mode, actor, policy = PAIRS["ppo"]
    # a low clip of 0.3: 2 valid tokens with A < 0 lie below it and 3 above the dual clip, so verl's
    # pg_clipfrac_lower (the dual clip's fraction) cannot pass for the low clip's
    actor = {**actor, "clip_ratio_low": 0.3}
    mask, logp, old, adv = batch()[:4]
    ratio, negative = (logp - old).exp(), mask & (adv < 0)
    assert int((negative & (ratio < 0.7)).sum()) == 2 and int((negative & (ratio > actor["clip_ratio_c"])).sum()) == 3
    want = run_ppo_loss(verl_mode, "token-mean", LOCAL, actor=actor)[2]
    got = run_ppo_loss("rlloss_ppo", "token-mean", LOCAL, actor=actor)[2]
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/pg_loss"):
        assert got[key].aggregate() == pytest.approx(want[key].aggregate(), rel=1e-6), key
    assert want["actor/pg_clipfrac_lower"].aggregate() > 0 and want["actor/pg_clipfrac"].aggregate() > 0


# every objective whose verl loss logs actor/pg_clipfrac: (verl loss_mode, ActorConfig fields, PolicyLossConfig fields)
CLIPPING = {**{name: PAIRS[name] for name in ("ppo", "gspo", "cispo", "dppo_tv", "dppo_kl", "clip_cov")},
            "gmpo": ("geo_mean", dict(clip_ratio_low=0.1, clip_ratio_high=0.15), {})}


@pytest.mark.parametrize("name", list(CLIPPING))
def test_clip_fractions_match_verl(name):
    """actor/pg_clipfrac (and pg_clipfrac_lower where verl logs it) as verl's own loss logs them, same batch."""
    verl_mode, actor, policy = CLIPPING[name]
    want = run_ppo_loss(verl_mode, "token-mean", LOCAL, actor=actor, policy=policy)[2]
    got = run_ppo_loss(rv.PREFIX + name, "token-mean", LOCAL, actor=actor, policy=policy)[2]
    keys = [key for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower") if key in want]
    assert "actor/pg_clipfrac" in keys and want["actor/pg_clipfrac"].aggregate() > 0  # the batch clips
    for key in keys:
        assert got[key].aggregate() == pytest.approx(want[key].aggregate(), rel=1e-6, abs=1e-7), key


def test_objectives_that_clip_nothing_log_no_clip_fraction():
    for name in set(rv.POLICY_LOSSES) - set(CLIPPING):
        policy = {"dro_beta": 0.3} if name == "dro" else {}
        got = run_ppo_loss(rv.PREFIX + name, "token-mean", LOCAL, policy=policy)[2]
        assert "actor/pg_clipfrac" not in got, name


@pytest.mark.parametrize("mode", MODES)
def test_verl_adds_kl_and_entropy_once(mode):
    """rlloss's losses are called with beta=0: verl's KL and entropy terms come on top, as for vanilla."""
    _, actor, _ = PAIRS["ppo"]
    want = run_ppo_loss("vanilla", mode, GLOBAL, actor=actor, kl=True, entropy=True)
    got = run_ppo_loss("rlloss_ppo", mode, GLOBAL, actor=actor, kl=True, entropy=True)
    assert_same(got, want)


@pytest.mark.parametrize("info", [LOCAL, GLOBAL], ids=["local", "global"])
@pytest.mark.parametrize("mode", MODES)
def test_gmpo_matches_verl_geo_mean(mode, info):
    """verl's geo_mean ignores loss_agg_mode and the global counts (a mean over the micro-batch rows);
    rlloss_gmpo divides by global_batch_size and multiplies by dp_size when verl gives them, so that
    micro-batches sum to the full-batch loss: equal without them, in that ratio with them."""
    actor = dict(clip_ratio_low=0.1, clip_ratio_high=0.15)
    want = run_ppo_loss("geo_mean", mode, info, actor=actor, is_weights=True)
    got = run_ppo_loss("rlloss_gmpo", mode, info, actor=actor, is_weights=True)
    scale = B * info["dp_size"] / info["global_batch_size"] if info["global_batch_size"] else 1.0
    assert_same((got[0] / scale, got[1] / scale), want)


def test_every_objective_has_a_loss():
    """One rlloss_ name per rlloss objective (the exported Objective subclasses)."""
    objectives = {cls for cls in vars(rlloss).values() if isinstance(cls, type) and issubclass(cls, rlloss.Objective)
                  and cls is not rlloss.Objective}
    config = ActorConfig(strategy="fsdp", rollout_n=1, use_dynamic_bsz=True, policy_loss=PolicyLossConfig(dro_beta=0.1))
    built = {type(build(config)) for build, _, _ in rv.POLICY_LOSSES.values()}
    assert objectives <= built
    for name in rv.POLICY_LOSSES:
        assert core_algos.get_policy_loss_fn(rv.PREFIX + name).__name__ == rv.PREFIX + name


def test_vespo_loss_is_rlloss_vespo():
    """No verl counterpart: rlloss_vespo through ppo_loss is rlloss.policy_loss(objective=VESPO())."""
    got = run_ppo_loss("rlloss_vespo", "token-mean", LOCAL)
    mask, logp, old, adv, *_ = batch()
    leaf = logp.clone().requires_grad_()
    loss = rlloss.policy_loss(leaf, old, adv, mask, objective=rlloss.VESPO()).loss
    (grad,) = torch.autograd.grad(loss, leaf)
    assert_same(got, (loss.detach(), grad))


# --- estimators ---------------------------------------------------------------------------------

UIDS = np.array(["b", "a", "b", "c", "a", "b", "d", "a", "c"], dtype=object)  # d alone; groups interleaved


def estimator_inputs(seed=0, signed=False):
    """Token rewards and mask; ``signed``: scores -1, 0, 1 instead of 0, 1, 2 (negative rewards)."""
    g = torch.Generator().manual_seed(seed)
    n = len(UIDS)
    lengths = torch.tensor([4, 1, 3, 4, 2, 4, 3, 1, 2])
    mask = (torch.arange(4)[None] < lengths[:, None]).float()
    rewards = torch.zeros(n, 4)
    scores = torch.randint(0, 3, (n,), generator=g).float() - (1.0 if signed else 0.0)
    scores[3] = scores[8]  # group c all equal
    rewards[torch.arange(n), lengths - 1] = scores
    rewards = rewards + 0.1 * torch.rand(n, 4, generator=g) * mask  # token rewards for the token estimators
    rewards[3], rewards[8] = rewards[8] * mask[3], rewards[8] * mask[8]
    return rewards, mask


# rlloss.integrations.verl.ESTIMATORS' names, written out so that this module imports without verl
ESTIMATOR_NAMES = ["grpo", "dr_grpo", "rloo", "opo", "gpg", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
                   "remax"]


def test_every_estimator_is_tested():
    assert sorted(rv.ESTIMATORS) == sorted(ESTIMATOR_NAMES)


@pytest.mark.parametrize("signed", [False, True], ids=["scores>=0", "signed-scores"])
@pytest.mark.parametrize("name", ESTIMATOR_NAMES)
def test_estimators_match_verl(name, signed):
    _, verl_name = rv.ESTIMATORS[name]
    rewards, mask = estimator_inputs(signed=signed)
    if signed:  # rows whose summed reward is negative (GPG's alpha counts them as signal)
        assert (rewards.sum(-1) < 0).any()
    config = AlgoConfig(gamma=0.9, norm_adv_by_std_in_grpo=name != "dr_grpo")
    kwargs = dict(response_mask=mask, index=UIDS, config=config)
    if name == "remax":
        kwargs["reward_baselines"] = torch.linspace(0.0, 1.0, len(UIDS))
    verl_kwargs = dict(kwargs)
    if verl_name == "grpo":
        verl_kwargs["norm_adv_by_std_in_grpo"] = config.norm_adv_by_std_in_grpo
    want = core_algos.get_adv_estimator_fn(verl_name)(token_level_rewards=rewards.clone(), **verl_kwargs)
    got = core_algos.get_adv_estimator_fn(rv.PREFIX + name)(token_level_rewards=rewards.clone(), **kwargs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert want[0].abs().max() > 0


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_through_compute_advantage(norm):
    """verl's trainer entry point: grpo (hard-coded there) against rlloss_grpo (through the registry)."""
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    rewards, mask = estimator_inputs(seed=3)

    def data():
        return DataProto.from_dict(tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone()},
                                   non_tensors={"uid": UIDS.copy()})

    want = compute_advantage(data(), "grpo", norm_adv_by_std_in_grpo=norm, config=AlgoConfig())
    got = compute_advantage(data(), "rlloss_grpo", config=AlgoConfig(norm_adv_by_std_in_grpo=norm))
    torch.testing.assert_close(got.batch["advantages"], want.batch["advantages"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.batch["returns"], want.batch["returns"], rtol=1e-5, atol=1e-6)


# --- registration -------------------------------------------------------------------------------

def test_reimport_is_idempotent():
    """verl's register_adv_est raises on a rebinding: a reload (a second import) must not."""
    before = core_algos.get_adv_estimator_fn("rlloss_grpo")
    importlib.reload(rv)
    rv.register()
    assert core_algos.get_adv_estimator_fn("rlloss_grpo") is before
    assert core_algos.get_policy_loss_fn("rlloss_ppo").__module__ == "rlloss.integrations.verl"


def test_foreign_estimator_name_still_raises():
    """Only rlloss's own earlier registrations are skipped; a name taken by someone else is verl's error."""
    core_algos.register_adv_est("rlloss_test_taken")(lambda **kwargs: None)
    with pytest.raises(ValueError, match="already been registered"):
        core_algos.register_adv_est("rlloss_test_taken")(lambda **kwargs: None)


def test_verl_plugins_entry_point_is_declared_and_loads():
    eps = [ep for ep in importlib.metadata.entry_points(group="verl.plugins") if ep.name == "rlloss"]
    assert [ep.value for ep in eps] == ["rlloss.integrations.verl"]
    assert eps[0].load() is rv


def test_import_verl_registers_rlloss_in_a_fresh_process():
    """verl loads its plugins on import: a worker that only imports verl sees the rlloss_ names."""
    code = ("import verl\nfrom verl.trainer.ppo import core_algos\n"
            "print(core_algos.get_policy_loss_fn('rlloss_ppo').__module__, "
            "core_algos.get_adv_estimator_fn('rlloss_grpo').__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["rlloss.integrations.verl", "rlloss.integrations.verl"]


def test_missing_verl_names_the_extra():
    code = ("import sys; sys.modules['verl'] = None; sys.modules['verl.trainer'] = None\n"
            "try:\n    import rlloss.integrations.verl\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # rlloss is not on PyPI: the command installs the extra from the checkout, as written.
    assert 'pip install -e ".[verl]"' in out and "checkout" in out


@pytest.mark.parametrize("loss_mode, adv_estimator", [("rlloss_ppo", "rlloss_grpo"), ("rlloss_cispo", "rlloss_rloo")])
def test_example_trains(loss_mode, adv_estimator):
    """examples/verl_loss.py, shortened: verl's compute_advantage and ppo_loss with rlloss names."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "verl_loss.py"
    spec = importlib.util.spec_from_file_location("verl_loss_example", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main(steps=2, loss_mode=loss_mode, adv_estimator=adv_estimator, quiet=True)
    assert len(rows) == 2
    assert all(np.isfinite(row["loss"]) and 0 <= row["reward"] <= 1 for row in rows)
