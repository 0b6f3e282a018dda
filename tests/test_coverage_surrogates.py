"""Every ``*_surrogate`` function and ``policy_loss``'s own clip keywords, each keyword away from its default,
against the float64 oracle of ``tests/test_oracles.py`` (SPEC written again as Python loops).

``test_oracles.py`` checks the objectives through ``policy_loss(objective=...)``; the per-token functions
(``cispo_surrogate``, ``sapo_surrogate``, ``vespo_surrogate``, ...), the log-ratio clamp ``max_log_ratio`` and
``policy_loss``'s PPO keywords (``eps_low=``, ``dual_clip=``, ... rather than ``objective=PPO(...)``) were run
by no test against an oracle, and several objective fields (VESPO's four, SAPO's temperatures, GMPO's lower
clip) only at their defaults. Each case here sets every keyword of one function to a value other than its
default, with ``max_log_ratio=1.0`` (so the clamp binds where the drawn log-ratios lie beyond +-1.1, which
SPEC's default 20 never clamps there), and compares a random weighting of the per-token losses (or of the
per-row losses, GMPO) and its gradient with the oracle's. What could fail: a keyword not passed on to the
objective, passed under another field, a clamp at the default instead of the argument, a mask dropped.
"""

from __future__ import annotations

import math

import pytest
import torch

import rlloss
import test_oracles as oracles
from helpers import BACKENDS, DEVICE, assert_close

F64 = torch.float64
MLR = 1.0  # max_log_ratio away from SPEC's 20: the drawn log-ratios of +-1.1 and beyond are clamped
TOKEN_SUM = {"aggregation": "token_sum", "beta": 0.0, "kl": "k3", "kl_bias_correction": False, "num_tokens": None,
             "num_seqs": None, "max_tokens": 9, "dp_size": 1}

# name -> (the public function, its keywords, the oracle's objective name and parameters, make_problem options).
# Every keyword differs from the function's default.
SURROGATES = {
    "clipped": (rlloss.clipped_surrogate, dict(eps_low=0.1, eps_high=0.15, dual_clip=2.5, delta=1.3, level="token"),
                "ppo", dict(eps_low=0.1, eps_high=0.15, dual_clip=2.5, delta=1.3), {}),
    "clipped-sequence": (rlloss.clipped_surrogate, dict(eps_low=0.05, eps_high=0.08, level="sequence"),
                         "gspo", dict(eps_low=0.05, eps_high=0.08), {"row_regions": True}),
    "cispo": (rlloss.cispo_surrogate, dict(low=0.8, high=1.3), "cispo", dict(low=0.8, high=1.3), {}),
    "sapo": (rlloss.sapo_surrogate, dict(tau_pos=0.7, tau_neg=1.6), "sapo", dict(tau_pos=0.7, tau_neg=1.6), {}),
    "reinforce": (rlloss.reinforce_surrogate, {}, "reinforce", {}, {}),
    "dppo-tv": (rlloss.dppo_surrogate, dict(divergence="tv", low=0.1, high=0.15, weight_cap=2.0),
                "dppo_tv", dict(divergence="tv", low=0.1, high=0.15, weight_cap=2.0), {"probability_like": True}),
    "dppo-kl": (rlloss.dppo_surrogate, dict(divergence="kl", low=0.03, high=0.3, weight_cap=1.5),
                "dppo_kl", dict(divergence="kl", low=0.03, high=0.3, weight_cap=1.5), {"probability_like": True}),
    "dro": (rlloss.dro_surrogate, dict(beta=0.3), "dro", dict(beta=0.3), {}),
    "vespo": (rlloss.vespo_surrogate, dict(k_pos=1.5, lam_pos=2.5, k_neg=2.5, lam_neg=1.5),
              "vespo", dict(k_pos=1.5, lam_pos=2.5, k_neg=2.5, lam_neg=1.5), {"row_regions": True}),
    "kl_cov": (rlloss.kl_cov_surrogate, dict(ratio=0.3, coef=0.5), "kl_cov", dict(ratio=0.3, coef=0.5), {}),
}
# the Triton kernel runs these per token (KL-Cov selects tokens across the batch: the reference alone)
FUSED = ["clipped", "clipped-sequence", "cispo", "sapo", "reinforce", "dppo-tv", "dppo-kl", "dro", "vespo"]
SEEDS = (3, 11)


def _problem(seed: int, draws: dict, name: str) -> oracles.Problem:
    return oracles.make_problem(seed, 4, 8, per_token_adv=name == "kl_cov" or seed % 2 == 1, **draws)


def _oracle(monkeypatch, pb: oracles.Problem, name: str, params: dict, weights: torch.Tensor, mods: dict = TOKEN_SUM):
    """The oracle's weighted loss and its gradient in ``logp``, with the clamp at ``MLR``."""
    monkeypatch.setattr(oracles, "MLR", MLR)
    leaf = pb.logp.clone().requires_grad_(True)
    binds = oracles.Binds()
    loss = oracles.oracle_loss(pb, leaf, name, params, mods, weights, binds)
    grad = (torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)[0] if loss.requires_grad
            else torch.zeros_like(leaf))
    return loss.detach(), grad, binds


def _rounded(pb: oracles.Problem, dtype: torch.dtype) -> oracles.Problem:
    """The problem as the function under test reads it (fp32 for the kernel), in float64 for the oracle."""
    return oracles.Problem(*(x.to(dtype).double() if x.is_floating_point() else x
                             for x in (pb.logp, pb.old, pb.ref, pb.adv, pb.mask)))


@pytest.mark.parametrize("case, seed, backend", [(case, seed, backend) for case in SURROGATES for seed in SEEDS
                                                  for backend in BACKENDS if backend == "torch" or case in FUSED])
def test_surrogate_keywords_match_the_oracle(case, seed, backend, monkeypatch):
    fn, kwargs, name, params, draws = SURROGATES[case]
    dtype = F64 if backend == "torch" else torch.float32  # fp64 never reaches the kernel
    pb = _rounded(_problem(seed, draws, name), dtype)
    weights = 0.5 + torch.rand(pb.mask.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    expected, expected_grad, binds = _oracle(monkeypatch, pb, name, params, weights)
    assert not binds.ambiguous, "a tie at KL-Cov's k-th covariance (SPEC leaves the choice open): pick another seed"
    assert binds.count > 0, "the draw binds none of the clips"
    leaf = pb.logp.to(device=DEVICE, dtype=dtype).requires_grad_(True)
    per_token = fn(leaf, pb.old.to(DEVICE, dtype), pb.adv.to(DEVICE, dtype), pb.mask.to(DEVICE), max_log_ratio=MLR,
                   backend=backend, **kwargs)
    assert per_token.shape == pb.mask.shape and not bool(per_token[~pb.mask.to(DEVICE)].any())
    loss = (per_token.double() * weights.to(DEVICE)).sum()
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)
    scale = binds.magnitude if backend != "torch" else 0.0
    assert_close(loss.detach().cpu(), expected, dtype, scale=scale, what=f"{case} loss")
    assert_close(grad.double().cpu(), expected_grad, dtype, scale=scale, what=f"{case} gradient")


@pytest.mark.parametrize("seed", SEEDS)
def test_gmpo_surrogate_keywords_match_the_oracle(seed, monkeypatch):
    """GMPO's loss is per row: a weighting of the rows, the oracle's ``seq_mean_token_mean`` with row weights."""
    pb = oracles.make_problem(seed, 4, 8, per_token_adv=seed % 2 == 1)
    weights = 0.5 + torch.rand(4, generator=torch.Generator().manual_seed(seed), dtype=F64)
    params = dict(log_clip_low=0.3, log_clip_high=0.5)
    expected, expected_grad, binds = _oracle(monkeypatch, pb, "gmpo", params, weights,
                                             {**TOKEN_SUM, "aggregation": "seq_mean_token_mean"})
    assert binds.count > 0
    leaf = pb.logp.to(DEVICE).requires_grad_(True)
    rows = rlloss.gmpo_surrogate(leaf, pb.old.to(DEVICE), pb.adv.to(DEVICE), pb.mask.to(DEVICE), max_log_ratio=MLR,
                                 backend="torch", **params)
    loss = (rows * weights.to(DEVICE)).sum() / 4
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)
    assert_close(loss.detach().cpu(), expected, F64, what="gmpo loss")
    assert_close(grad.cpu(), expected_grad, F64, what="gmpo gradient")


def _clip_cov_by_hand(pb: oracles.Problem, eps_low: float, eps_high: float, cov_low: float, cov_high: float):
    """SPEC's Clip-Cov per valid token: ``(is a candidate, max(l1, l2))``, the log-ratio clamped at ``MLR``."""
    valid = [(i, t) for i in range(pb.mask.shape[0]) for t in range(pb.mask.shape[1]) if pb.mask[i, t]]
    mean_a = sum(pb.a(i, t) for i, t in valid) / len(valid)
    mean_lp = sum(float(pb.logp[i, t]) for i, t in valid) / len(valid)
    out = {}
    for i, t in valid:
        r = math.exp(min(max(float(pb.logp[i, t] - pb.old[i, t]), -MLR), MLR))
        a = pb.a(i, t)
        l1, l2 = -a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)
        cov = (a - mean_a) * (float(pb.logp[i, t]) - mean_lp)
        out[i, t] = (l2 <= l1 and cov_low < cov < cov_high, max(l1, l2))
    return out


CLIP_COV = dict(cov_low=-0.5, cov_high=2.0, eps_low=0.15, eps_high=0.3)


def test_clip_cov_keywords_by_hand():
    """Clip-Cov with every keyword set, worked per token here from SPEC (the oracle file's Clip-Cov reads only
    ``eps_low``): with ``ratio=1`` every candidate is cut whatever the seed, through ``clip_cov_surrogate`` and
    through ``policy_loss(objective=ClipCov(...))``; with ``ratio=0.1`` exactly ``max(int(0.1 N), 1)`` of them
    (or all, if fewer), and the seed decides which."""
    drawn = {}
    for seed in SEEDS:
        pb = oracles.make_problem(seed, 4, 8, per_token_adv=True)
        logp, old, adv, mask = pb.logp.to(DEVICE), pb.old.to(DEVICE), pb.adv.to(DEVICE), pb.mask.to(DEVICE)
        tokens = _clip_cov_by_hand(pb, **CLIP_COV)
        assert any(c for c, _ in tokens.values()) and any(abs(float(pb.logp[k] - pb.old[k])) > MLR for k in tokens)
        out = rlloss.clip_cov_surrogate(logp, old, adv, mask, ratio=1.0, seed=7, max_log_ratio=MLR, backend="torch",
                                        **CLIP_COV).cpu()
        for key, (candidate, rest) in tokens.items():
            assert math.isclose(float(out[key]), 0.0 if candidate else rest, rel_tol=1e-12, abs_tol=1e-12), (seed, key)
        assert not bool(out[~pb.mask].any())
        total = rlloss.policy_loss(logp, old, adv, mask, objective=rlloss.ClipCov(ratio=1.0, seed=7, **CLIP_COV),
                                   max_log_ratio=MLR, aggregation="token_sum", backend="torch").loss
        assert math.isclose(float(total), sum(0.0 if c else rest for c, rest in tokens.values()), rel_tol=1e-12)
        candidates = {key for key, (c, _) in tokens.items() if c}
        k = min(max(int(0.1 * len(tokens)), 1), len(candidates))
        assert k < len(candidates)  # a draw to make
        for draw in (8, 9):
            out = rlloss.clip_cov_surrogate(logp, old, adv, mask, ratio=0.1, seed=draw, max_log_ratio=MLR,
                                            backend="torch", **CLIP_COV).cpu()
            zeroed = {key for key in candidates if float(out[key]) == 0.0}
            assert len(zeroed) == k, (seed, draw)
            for key, (_, rest) in tokens.items():
                if key not in zeroed:
                    assert math.isclose(float(out[key]), rest, rel_tol=1e-12, abs_tol=1e-12), (seed, draw, key)
            drawn[seed, draw] = zeroed
    assert any(drawn[seed, 8] != drawn[seed, 9] for seed in SEEDS), "the seed changes no draw"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_clip_keywords_match_the_oracle(level, backend, monkeypatch):
    """``policy_loss``'s own PPO keywords (not ``objective=``), each away from its default, with the clamp
    ``max_log_ratio``: the oracle's PPO (token level: clip-higher, dual clip, delta) or GSPO (sequence level)."""
    dtype = F64 if backend == "torch" else torch.float32
    if level == "token":
        kwargs = dict(eps_low=0.1, eps_high=0.15, dual_clip=2.5, delta=1.3)
        name, draws = "ppo", {}
    else:
        kwargs = dict(eps_low=0.05, eps_high=0.08)
        name, draws = "gspo", {"row_regions": True}
    pb = _rounded(oracles.make_problem(5, 4, 8, per_token_adv=level == "token", **draws), dtype)
    expected, expected_grad, binds = _oracle(monkeypatch, pb, name, kwargs, None)
    assert binds.count > 0
    leaf = pb.logp.to(device=DEVICE, dtype=dtype).requires_grad_(True)
    out = rlloss.policy_loss(leaf, pb.old.to(DEVICE, dtype), pb.adv.to(DEVICE, dtype), pb.mask.to(DEVICE),
                             level=level, max_log_ratio=MLR, aggregation="token_sum", backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    scale = binds.magnitude if backend != "torch" else 0.0
    assert_close(out.loss.detach().double().cpu(), expected, dtype, scale=scale, what=f"{level} loss")
    assert_close(grad.double().cpu(), expected_grad, dtype, scale=scale, what=f"{level} gradient")


# Objective fields the oracle file runs only at their defaults (VESPO, SAPO) or one of them (GMPO's lower clip)
OBJECTIVES = {
    "vespo": (rlloss.VESPO(k_pos=1.5, lam_pos=2.5, k_neg=2.5, lam_neg=1.5),
              dict(k_pos=1.5, lam_pos=2.5, k_neg=2.5, lam_neg=1.5), {"row_regions": True}),
    "sapo": (rlloss.SAPO(tau_pos=0.7, tau_neg=1.6), dict(tau_pos=0.7, tau_neg=1.6), {}),
    "gmpo": (rlloss.GMPO(log_clip_low=0.3, log_clip_high=0.5), dict(log_clip_low=0.3, log_clip_high=0.5), {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_fields_match_the_oracle(name, backend, monkeypatch):
    """The objective's fields away from their defaults through ``policy_loss(objective=...)``, with a k3 KL,
    bias-corrected, and the clamp at ``MLR``; GMPO's only aggregation, the others ``token_sum``."""
    objective, params, draws = OBJECTIVES[name]
    dtype = F64 if backend == "torch" else torch.float32
    pb = _rounded(oracles.make_problem(9, 4, 8, per_token_adv=False, **draws), dtype)
    aggregation = "seq_mean_token_mean" if name == "gmpo" else "token_sum"
    mods = {**TOKEN_SUM, "aggregation": aggregation, "beta": 0.04, "kl_bias_correction": True}
    expected, expected_grad, binds = _oracle(monkeypatch, pb, name, params, None, mods)
    assert binds.count > 0
    leaf = pb.logp.to(device=DEVICE, dtype=dtype).requires_grad_(True)
    out = rlloss.policy_loss(leaf, pb.old.to(DEVICE, dtype), pb.adv.to(DEVICE, dtype), pb.mask.to(DEVICE),
                             objective=objective, ref_logp=pb.ref.to(DEVICE, dtype), beta=0.04,
                             kl_bias_correction=True, max_log_ratio=MLR, aggregation=aggregation, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    scale = binds.magnitude if backend != "torch" else 0.0
    assert_close(out.loss.detach().double().cpu(), expected, dtype, scale=scale, what=f"{name} loss")
    assert_close(grad.double().cpu(), expected_grad, dtype, scale=scale, what=f"{name} gradient")
