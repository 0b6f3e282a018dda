"""The audit's keywords away from their defaults: ``audit_loss``'s seed and equal rows, ``audit_trl``'s processes
and seed, ``audit_verl``'s shape and seed, and the label of an ``Audit``.

Expected results come from formulas, never from the audit: an exact rlloss loss (global counts) is its
aggregation at scale 1 for any probe draw, a token mean divided once more by the accumulation steps is at
``1/micro_batches``; for the trainers, the model of their code that ``tests/test_audit_trainers.py``
writes from their source (imported from there), run here at the same seed and shape as the audit. What
could fail: a seed or shape not passed on to the probe (the model then disagrees in every candidate's
scale and residual), the processes of TRL not emulated, verl's response width not used as the budget.
"""

from __future__ import annotations

import dataclasses

import pytest

import rlloss
from helpers import require_trainer
from rlloss.audit import Audit, audit_loss
from rlloss.audit.measure import accumulate, audit_steps


def exact_token_mean(logp, old_logp, adv, mask, window):
    """rlloss's token mean with the step's counts from the window: exact under any split."""
    return rlloss.policy_loss(logp, old_logp, adv, mask, num_tokens=window.num_tokens, dp_size=window.dp_size).loss


def divided_again(logp, old_logp, adv, mask, window):
    """The same, divided once more by the accumulation steps (scale ``1/micro_batches``)."""
    return exact_token_mean(logp, old_logp, adv, mask, window) / window.micro_batches


@pytest.mark.parametrize("seed", [5, 9])
@pytest.mark.parametrize("equal_rows", [False, True])
def test_audit_loss_seed_and_equal_rows(seed, equal_rows):
    """Any probe draw and either kind of split: the exact loss at scale 1, the divided one at 1/3."""
    exact = audit_loss(exact_token_mean, micro_batches=3, dp_size=2, seed=seed, equal_rows=equal_rows)
    assert exact.aggregation == "token_mean" and exact.scale == pytest.approx(1.0, abs=1e-6)
    assert exact.split_invariant and exact.residual < 1e-9
    divided = audit_loss(divided_again, micro_batches=3, dp_size=2, seed=seed, equal_rows=equal_rows)
    assert divided.aggregation == "token_mean" and divided.scale == pytest.approx(1 / 3, abs=1e-6)
    # the seed draws other probe batches: the same loss measures another gradient norm
    other = audit_loss(exact_token_mean, micro_batches=3, dp_size=2, seed=seed + 1, equal_rows=equal_rows)
    assert other.grad_norm != exact.grad_norm


def test_an_audits_label_heads_its_report():
    audit = audit_loss(exact_token_mean, micro_batches=2)
    assert isinstance(audit, Audit) and audit.label == "exact_token_mean"
    relabelled = dataclasses.replace(audit, label="my trainer's loss")
    assert relabelled.report().splitlines()[0] == "audit of my trainer's loss"


# --- the trainers' front ends (marker trainers: TRL 1.16 and verl 0.9.1) ---------------------------------------


def _model(weight, *, micro_batches, dp_size, max_tokens, longest, width, equal_rows, seed):
    """``tests/test_audit_trainers.py``'s ``model_audit`` at a given probe seed."""
    def step(batch, split):
        def run_piece(piece, inputs):
            n = inputs.mask.sum(-1, keepdim=True).to(inputs.logp.dtype)
            return 0.0, -inputs.adv[:, None] * inputs.mask * weight(batch, split, piece, n)
        return accumulate(batch, split, run_piece, max_tokens)
    return audit_steps(step, micro_batches=micro_batches, dp_size=dp_size, max_tokens=max_tokens, seed=seed,
                       longest=longest, width=width, equal_rows=equal_rows)


def _trainers():
    try:
        import test_audit_trainers as trainers
        missing = trainers.TRAINERS_MISSING
    except ImportError as exc:
        trainers, missing = None, exc
    require_trainer(missing)
    return trainers


@pytest.mark.trainers
def test_audit_trl_processes_and_seed():
    """Two emulated processes and another probe seed: every number as the model of TRL's dapo normaliser."""
    trainers = _trainers()
    from rlloss.audit import audit_trl
    from rlloss.audit.table import TrlCase

    case = TrlCase("dapo", 2, 2, 2)
    audit = audit_trl(case.config(), num_processes=2, seed=3)
    want = _model(trainers.trl_weight(case, 0.2), micro_batches=2, dp_size=2, max_tokens=512, longest=512,
                  width=None, equal_rows=True, seed=3)
    trainers.assert_same_measure(audit, want)
    assert audit.aggregation == "token_mean" and audit.dp_size == 2


@pytest.mark.trainers
def test_audit_verl_shape_and_seed():
    """Three micro-batches on one rank, responses of 32, another seed: the model of verl's seq-mean-token-sum-norm
    (whose constant is then the width, 32)."""
    trainers = _trainers()
    from rlloss.audit import audit_verl
    from rlloss.audit.table import VerlCase

    case = VerlCase("seq-mean-token-sum-norm")
    audit = audit_verl(case.config(), micro_batches=3, dp_size=1, response_length=32, seed=4)

    def weight(batch, split, piece, n):  # verl's agg_loss (core_algos.py L1170-1205): / (rows * width), * dp_size
        return 1.0 / (batch.mask.shape[0] * 32)

    want = _model(weight, micro_batches=3, dp_size=1, max_tokens=32, longest=32, width=32, equal_rows=False, seed=4)
    trainers.assert_same_measure(audit, want)
    assert audit.aggregation == "constant" and audit.max_tokens == 32 and audit.micro_batches == 3
