"""TRL options the integration translates that no other test set away from their defaults, against TRL itself.

Same method as ``tests/test_integrations_trl.py`` (whose model, batch and comparison this module imports):
stock ``trl.GRPOTrainer`` and rlloss's subclass built from one config, TRL's ``_compute_loss`` against ours on
one micro-batch, or TRL's advantages against ours on the same generations. The options: VESPO's four
parameters (``vespo_k_pos``, ...), ``vllm_importance_sampling_correction=False`` with vLLM on, an explicit
``router_aux_loss_coef`` (the model's own coefficient otherwise), ``reward_weights`` and
``num_generations_eval``, and ``objective=`` given an rlloss objective that is one of TRL's own loss types
(so that TRL is the oracle). What could fail: a parameter read from the default or from another field, the
vLLM ratio applied although its correction is off, the config's auxiliary coefficient ignored for the
model's, the reward weights or the eval group size left out of the advantages.
"""

from __future__ import annotations

import pytest
import torch

import rlloss
import test_integrations_trl as base
from helpers import require_trainer
from test_integrations_trl import checkpoint  # noqa: F401  (the fixture: a tiny Qwen2 on disk)

pytestmark = pytest.mark.trainers


@pytest.fixture(autouse=True)
def _trl_installed():
    require_trainer(base.TRL_MISSING)


# (TRL config, attributes set after building, make_inputs options), as base.CASES
CASES = {
    "vespo-parameters": (dict(loss_type="vespo", beta=0.1, vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5,
                              vespo_lambda_neg=1.5), {}, {}),
    "dapo-vllm-uncorrected": (dict(loss_type="dapo"), dict(use_vllm=True, vllm_importance_sampling_correction=False),
                              dict(vllm="token_truncate")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compute_loss_matches_trl(checkpoint, tmp_path, case):  # noqa: F811
    config, attrs, input_options = CASES[case]
    base.compare(checkpoint, tmp_path, config, attrs, input_options)


def test_vespo_parameters_change_the_loss(checkpoint, tmp_path):  # noqa: F811
    """The case above is not vacuous: VESPO's defaults give another loss on the same batch."""
    losses = []
    for config in (CASES["vespo-parameters"][0], dict(loss_type="vespo", beta=0.1)):
        trainer = base.build(base.GRPOTrainer, checkpoint, tmp_path, **config)
        losses.append(base.loss_and_grads(trainer, base.make_inputs(trainer))[0])
    assert not torch.allclose(losses[0], losses[1])


@pytest.mark.parametrize("objective, config", [
    (rlloss.SAPO(tau_pos=0.8, tau_neg=1.3), dict(loss_type="sapo", sapo_temperature_pos=0.8, sapo_temperature_neg=1.3)),
    (rlloss.CISPO(low=None, high=1.5), dict(loss_type="cispo", epsilon_high=1.5)),
    (rlloss.PPO(eps_low=0.2, eps_high=0.28, delta=1.3), dict(loss_type="dapo", epsilon_high=0.28, delta=1.3)),
])
def test_an_objective_equal_to_the_loss_type_is_trls_loss(checkpoint, tmp_path, objective, config):  # noqa: F811
    """``objective=`` replaces the surrogate and keeps ``loss_type``'s normaliser, KL and masks: given the very
    objective the loss type computes, loss and gradient are TRL's (its metrics are rlloss's, under rlloss/)."""
    config = {**config, "beta": 0.1}
    stock = base.build(base.trl.GRPOTrainer, checkpoint, tmp_path, **config)
    ours = base.build(base.GRPOTrainer, checkpoint, tmp_path, extra=dict(objective=objective), **config)
    inputs = base.make_inputs(stock)
    want_loss, want_grads = base.loss_and_grads(stock, inputs)
    got_loss, got_grads = base.loss_and_grads(ours, inputs)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-7)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    assert "rlloss/num_tokens" in ours._metrics["train"]


def test_router_aux_loss_coef_of_the_config_matches_trl(checkpoint, tmp_path_factory):  # noqa: F811
    """A tiny Qwen2-MoE whose own coefficient is 0.1, trained with ``router_aux_loss_coef=0.3``: TRL's loss."""
    moe = base.tiny_moe_checkpoint(checkpoint, tmp_path_factory)
    trainers = [base.build(cls, moe, tmp_path_factory.mktemp("out"), loss_type="grpo", router_aux_loss_coef=0.3)
                for cls in (base.trl.GRPOTrainer, base.GRPOTrainer)]
    assert [t.router_aux_loss_coef for t in trainers] == [0.3, 0.3] and all(t.aux_loss_enabled for t in trainers)
    inputs = base.make_inputs(trainers[0])
    (want, want_grads), (got, got_grads) = (base.loss_and_grads(t, inputs) for t in trainers)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-7, msg=name)


# the seeds draw generations where some group holds two different scorable rewards (advantages not all 0)
@pytest.mark.parametrize("options, eval_mode, seed", [
    (dict(scale_rewards="none", reward_weights=[0.5]), False, 123),
    (dict(num_generations_eval=2, per_device_eval_batch_size=8), True, 1),
])
def test_advantages_match_trl(checkpoint, tmp_path, options, eval_mode, seed):  # noqa: F811
    """Generated and scored by each trainer from the same seed: TRL's advantages (weighted rewards; in eval,
    groups of ``num_generations_eval``)."""
    group = options.get("num_generations_eval", 4)
    prompts = [{"prompt": p} for p in ["1 2 3", "4 5", "6 7", "8"][:8 // group] for _ in range(group)]
    outputs = []
    for cls in (base.trl.GRPOTrainer, base.GRPOTrainer):
        trainer = base.build(cls, checkpoint, tmp_path, per_device_train_batch_size=8, max_completion_length=5,
                             temperature=1.5, **options)
        if eval_mode:
            trainer.model.eval()
        torch.manual_seed(seed)
        outputs.append(trainer._generate_and_score_completions(prompts))
    want, got = outputs
    assert torch.equal(want["completion_ids"], got["completion_ids"])
    torch.testing.assert_close(got["advantages"], want["advantages"], rtol=1e-5, atol=1e-6)
    assert want["advantages"].abs().max() > 0.1
