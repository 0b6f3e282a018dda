"""The objectives beyond PPO: hand-worked values, defining properties, modifiers, errors, both backends."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlloss
from helpers import BACKENDS, DEVICE, TOLERANCES, assert_close, triton_runs_here
from strategies import LossProblem, loss_magnitude, loss_problems, make_problem

needs_triton = pytest.mark.skipif(not triton_runs_here(), reason="needs triton with a CUDA device or TRITON_INTERPRET=1")


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype, device=DEVICE)


def per_token(fn, d, adv, logp0=-1.0, backend="torch", **kw):
    """(loss, d loss / d logp) of a per-token objective function at log-ratios ``d``."""
    old = t([[logp0] * len(d)])
    leaf = (old + t([d])).requires_grad_(True)
    loss = fn(leaf, old, t(adv), backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss[0], grad[0], leaf.detach()[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cispo_keeps_the_gradient_of_clipped_tokens(backend):
    # r = e^1 = 2.718 > high = 2: the weight is capped at 2 but the token still learns: -2 * A
    loss, grad, logp = per_token(rlloss.cispo_surrogate, [1.0, 0.1], [[1.0, -1.0]], high=2.0, backend=backend)
    torch.testing.assert_close(loss, t([-2.0 * logp[0].item(), math.exp(0.1) * logp[1].item()]))
    torch.testing.assert_close(grad, t([-2.0, math.exp(0.1)]))
    ppo_loss, ppo_grad, _ = per_token(rlloss.clipped_surrogate, [1.0], [[1.0]], backend=backend)
    assert ppo_grad.item() == 0.0  # where PPO's clip cuts it off


@pytest.mark.parametrize("backend", BACKENDS)
def test_sapo_gradient_is_smooth_where_ppo_is_cut(backend):
    d = math.log(1.5)  # r = 1.5, beyond PPO's 1.2
    loss, grad, _ = per_token(rlloss.sapo_surrogate, [d, d], [[1.0, -1.0]], backend=backend)
    sig_pos, sig_neg = 1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(-1.05 * 0.5))
    torch.testing.assert_close(loss, t([-4 * sig_pos, 4 / 1.05 * sig_neg]))
    # d/dlogp of -A (4/tau) sigmoid(tau (r - 1)) = -A * 4 * s (1 - s) * r
    torch.testing.assert_close(grad, t([-4 * sig_pos * (1 - sig_pos) * 1.5, 4 * sig_neg * (1 - sig_neg) * 1.5]))
    assert per_token(rlloss.clipped_surrogate, [d], [[1.0]], backend=backend)[1].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["tv", "kl"])
def test_dppo_zeroes_tokens_outside_its_trust_region(backend, divergence):
    # p = exp(logp): old p = 0.3; token 0 moves to p = 0.7 (p - q = 0.4 > 0.2) with A > 0: outside;
    # token 1 moves to p = 0.35 (inside); token 2 falls to 0.05 with A < 0 (p - q = -0.25 < -0.2): outside.
    q, p = 0.3, [0.7, 0.35, 0.05]
    old = t([[math.log(q)] * 3])
    leaf = t([[math.log(x) for x in p]]).requires_grad_(True)
    adv = t([[1.0, 1.0, -1.0]])
    loss = rlloss.dppo_surrogate(leaf, old, adv, divergence=divergence, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    if divergence == "tv":
        torch.testing.assert_close(grad, t([[0.0, -(0.35 / 0.3), 0.0]]))
    else:  # binary KL of token 1 is small (inside), of tokens 0 and 2 large (outside)
        b = [q * math.log(q / x) + (1 - q) * math.log((1 - q + 1e-8) / (1 - x + 1e-8)) for x in p]
        assert b[0] > 0.2 and b[1] < 0.2 and b[2] > 0.2
        torch.testing.assert_close(grad, t([[0.0, -(0.35 / 0.3), 0.0]]))
    assert loss[0, 0].item() == 0.0 and loss[0, 2].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_reinforce_and_dro(backend):
    loss, grad, logp = per_token(rlloss.reinforce_surrogate, [0.3], [[2.0]], backend=backend)
    torch.testing.assert_close(loss, t([-2.0 * logp[0].item()]))
    torch.testing.assert_close(grad, t([-2.0]))
    loss, grad, logp = per_token(rlloss.dro_surrogate, [0.3], [[2.0]], beta=0.5, backend=backend)
    torch.testing.assert_close(loss, t([-(2.0 * logp[0].item() - 0.25 * 0.09)]))
    torch.testing.assert_close(grad, t([-(2.0 - 0.5 * 0.3)]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vespo_weight_is_one_at_ratio_one(backend):
    loss, grad, logp = per_token(rlloss.vespo_surrogate, [0.0, 0.0], [[1.5, -0.5]], backend=backend)
    torch.testing.assert_close(loss, t([-1.5 * logp[0].item(), 0.5 * logp[1].item()]))
    torch.testing.assert_close(grad, t([-1.5, 0.5]))
    # a row log-ratio sum of 0.5 (0.2 + 0.3): w = e^0.5, phi = exp(lam + k lw - lam w) with (k, lam) = (2, 3)
    loss, grad, _ = per_token(rlloss.vespo_surrogate, [0.2, 0.3], [[1.0, 1.0]], backend=backend)
    phi = math.exp(3 + 2 * 0.5 - 3 * math.exp(0.5))
    torch.testing.assert_close(grad, t([-phi, -phi]))


def test_gmpo_row_ratio_is_a_geometric_mean():
    old = t([[-1.0, -2.0, -1.5]])
    d = [0.1, 0.3, 1.0]  # the last is past log_clip_high = 0.4: clipped to 0.4 for A > 0
    leaf = (old + t([d])).requires_grad_(True)
    mask = torch.tensor([[True, True, True]], device=DEVICE)
    row = rlloss.gmpo_surrogate(leaf, old, t([2.0]), mask)
    rho = math.exp((0.1 + 0.3 + 0.4) / 3)
    torch.testing.assert_close(row, t([-2.0 * rho]))
    (grad,) = torch.autograd.grad(row.sum(), leaf)
    torch.testing.assert_close(grad, t([[-2.0 * rho / 3, -2.0 * rho / 3, 0.0]]))
    perm = [2, 0, 1]
    permuted = rlloss.gmpo_surrogate(leaf.detach()[:, perm], old[:, perm], t([2.0]), mask)
    torch.testing.assert_close(permuted, row.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gmpo_policy_loss_with_row_weights(backend):
    p = make_problem(3, 6, torch.float32, seed=4, spread=0.1, mask_kind="random")
    weights = t([0.5, 1.0, 2.0])
    out = rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask, objective="gmpo", token_weights=weights,
                             aggregation="seq_mean_token_mean", backend=backend)
    rows = rlloss.gmpo_surrogate(p.logp.detach(), p.old_logp, p.adv, p.mask)
    torch.testing.assert_close(out.loss, (weights * rows).sum() / 3)


@needs_triton
def test_gmpo_surrogate_on_triton_points_to_policy_loss():
    """GMPO's loss is per row: the per-token surrogate op has nothing to return, policy_loss runs it fused."""
    p = make_problem(2, 5, torch.float32, seed=3)
    with pytest.raises(ValueError, match="policy_loss runs GMPO fused"):
        rlloss.gmpo_surrogate(p.logp, p.old_logp, p.adv, p.mask, backend="triton")


def test_kl_cov_adds_the_penalty_to_the_largest_covariance_token():
    logp = t([[-1.0, -3.0], [-2.0, -0.5]])
    old = logp - t([[0.1, -0.2], [0.3, 0.05]])
    adv = t([1.0, -1.0])
    loss = rlloss.kl_cov_surrogate(logp, old, adv, ratio=0.25, coef=0.5)  # k = max(1, int(4 * 0.25)) = 1
    # mean A = 0, mean logp = -1.625; cov = A * (logp + 1.625): 0.625, -1.375, 0.375, -1.125 -> token (0, 0)
    ratio = torch.exp(logp - old)
    base = -t([[1.0, 1.0], [-1.0, -1.0]]) * ratio
    torch.testing.assert_close(loss, base + t([[0.5 * 0.1, 0.0], [0.0, 0.0]]))


def test_clip_cov_zeroes_a_seeded_draw_of_candidates():
    p = make_problem(4, 50, torch.float32, seed=8, spread=0.5)
    kw = {"ratio": 0.05, "cov_low": -100.0, "cov_high": 100.0}
    first = rlloss.clip_cov_surrogate(p.logp, p.old_logp, p.adv, p.mask, **kw)
    again = rlloss.clip_cov_surrogate(p.logp, p.old_logp, p.adv, p.mask, **kw)
    assert torch.equal(first, again)
    ratio = torch.exp((p.logp - p.old_logp).detach())
    a = p.adv[:, None].expand_as(ratio)
    l1, l2 = -a * ratio, -a * ratio.clamp(0.8, 1.2)
    kept = torch.maximum(l1, l2)
    zeroed = p.mask & (first == 0) & (kept != 0)
    n_valid = int(p.mask.sum())
    assert int(zeroed.sum()) == min(max(int(0.05 * n_valid), 1), int((p.mask & (l2 <= l1)).sum()))
    assert torch.all((l2 <= l1)[zeroed])
    torch.testing.assert_close(first[p.mask & ~zeroed], kept[p.mask & ~zeroed])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_kinds(backend):
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    assert torch.equal(rlloss.kl_estimate(logp, ref, kind="abs", backend=backend), t([0.5, 1.0]))
    for kind, base in (("k1+", "k1"), ("k3+", "k3"), ("abs+", "abs")):
        leaf = logp.clone().requires_grad_(True)
        value = rlloss.kl_estimate(leaf, ref, kind=kind, backend=backend)
        torch.testing.assert_close(value, rlloss.kl_estimate(logp, ref, kind=base, backend="torch"))
        (grad,) = torch.autograd.grad(value.sum(), leaf)
        torch.testing.assert_close(grad, logp - ref)  # k2's gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_weights_multiply_the_surrogate_only(backend):
    p = make_problem(2, 5, torch.float32, seed=3, mask_kind="full")
    kw = {"ref_logp": p.ref_logp, "beta": 0.1, "backend": backend}
    zero = rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask, token_weights=torch.zeros(2, 5, device=DEVICE), **kw)
    kl_only = 0.1 * rlloss.k3_kl(p.logp, p.ref_logp).mean()
    torch.testing.assert_close(zero.loss, kl_only)
    half = rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask, token_weights=torch.full((2,), 0.5, device=DEVICE), **kw)
    full = rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask, **kw)
    torch.testing.assert_close(half.loss, 0.5 * (full.loss - kl_only) + kl_only)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_bias_correction_multiplies_by_the_ratio(backend):
    p = make_problem(2, 7, torch.float32, seed=5, mask_kind="full", spread=0.2)
    out = rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask, ref_logp=p.ref_logp, kl_bias_correction=True,
                             backend=backend)
    want = (rlloss.k3_kl(p.logp, p.ref_logp) * torch.exp(p.logp - p.old_logp)).mean()
    torch.testing.assert_close(out.metrics["kl_mean"], want.detach())


def test_token_sum_aggregation():
    logp = t([[-1.0, -1.0, -1.0]] * 2)
    mask = torch.tensor([[True, True, False], [True, False, False]], device=DEVICE)
    out = rlloss.policy_loss(logp, None, -t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), mask, aggregation="token_sum",
                             dp_size=2)
    assert out.loss.item() == pytest.approx(2 * (1 + 2 + 4))


def _gradcheck_inputs():
    gen = torch.Generator().manual_seed(9)
    logp = (-torch.rand(2, 5, generator=gen, dtype=torch.float64) * 2 - 0.5).to(DEVICE)
    d = torch.tensor([[0.05, -0.05, 0.1, -0.1, 0.02], [0.07, -0.03, 0.04, -0.06, 0.01]], dtype=torch.float64,
                     device=DEVICE)
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64, device=DEVICE)
    ref = logp + 0.2 * torch.randn(2, 5, generator=gen, dtype=torch.float64).to(DEVICE)
    return logp.requires_grad_(True), logp.detach() - d, adv, ref


@pytest.mark.parametrize("objective", [rlloss.PPO(delta=1.5), "sapo", "reinforce", rlloss.DRO(beta=0.3), "gmpo"])
@pytest.mark.parametrize("kl", ["k1", "k2", "k3", "abs"])
def test_gradcheck_objectives(objective, kl):
    """Objectives whose gradient is the derivative of their value (no stop-gradient inside)."""
    logp, old, adv, ref = _gradcheck_inputs()
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    agg = "seq_mean_token_mean"

    def f(x):
        return rlloss.policy_loss(x, old, adv, mask, objective=objective, ref_logp=ref, beta=0.1, kl=kl,
                                  kl_bias_correction=True, aggregation=agg, backend="torch").loss

    assert torch.autograd.gradcheck(f, (logp,))


# --- both backends on drawn problems ----------------------------------------------------------

FUSED = [None, rlloss.PPO(delta=1.4, dual_clip=3.0, eps_high=0.28), rlloss.CISPO(), rlloss.CISPO(low=0.8, high=1.2),
         rlloss.SAPO(), rlloss.Reinforce(), rlloss.DPPO(), rlloss.DPPO(divergence="kl", low=0.1, high=0.3),
         rlloss.DRO(beta=0.1), rlloss.VESPO(), rlloss.PPO(level="sequence", eps_low=3e-4, eps_high=4e-4),
         rlloss.GMPO(), rlloss.GMPO(log_clip_low=0.05, log_clip_high=0.2)]


def _per_row(objective) -> bool:
    return isinstance(objective, rlloss.GMPO)


@st.composite
def modifiers(draw, problem: LossProblem) -> dict:
    b, t_ = problem.logp.shape
    objective = draw(st.sampled_from(FUSED))
    aggregations = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum"]
    kw = {"objective": objective,
          "aggregation": "seq_mean_token_mean" if _per_row(objective) else draw(st.sampled_from(aggregations)),
          "kl": draw(st.sampled_from(["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"]))}
    if draw(st.booleans()):
        kw.update(ref_logp=problem.ref_logp, beta=0.04)
        kw["kl_bias_correction"] = draw(st.booleans())  # at sequence level (GSPO) through the row mean
    weights = draw(st.sampled_from([None, "row", "token"]))
    if weights:
        gen = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
        kw["token_weights"] = torch.rand((b,) if weights == "row" else (b, t_), generator=gen).to(DEVICE)
    return kw


def _run(problem, backend, kw):
    leaf = problem.fresh_logp()
    out = rlloss.policy_loss(leaf, problem.old_logp, problem.adv, problem.mask, backend=backend, **kw)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    return out, grad


@needs_triton
@given(problem=loss_problems(max_t=1100), data=st.data())
def test_fused_objectives_match_reference(problem, data):
    _assert_fused_matches_reference(problem, data.draw(modifiers(problem)))


ROW_STATISTIC = [rlloss.GMPO(), rlloss.GMPO(log_clip_low=0.05, log_clip_high=0.2),
                 rlloss.PPO(level="sequence", eps_low=3e-4, eps_high=4e-4)]


@needs_triton
@given(problem=loss_problems(max_t=1100), data=st.data())
def test_row_statistic_objectives_match_reference_with_kl(problem, data):
    """GMPO and GSPO with a KL term, bias-corrected or not (at sequence level for GSPO: its gradient
    runs through the row mean), every draw: the pre-pass's row sums against the reference."""
    b, t_ = problem.logp.shape
    objective = data.draw(st.sampled_from(ROW_STATISTIC))
    kw = {"objective": objective, "aggregation": "seq_mean_token_mean" if _per_row(objective) else
          data.draw(st.sampled_from(["token_mean", "seq_mean_token_mean", "token_sum"])),
          "kl": data.draw(st.sampled_from(["k1", "k2", "k3", "abs", "k3+"])), "ref_logp": problem.ref_logp,
          "beta": data.draw(st.sampled_from([0.04, 1.0])), "kl_bias_correction": data.draw(st.booleans())}
    weights = data.draw(st.sampled_from([None, "row", "token"]))
    if weights:
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
        kw["token_weights"] = torch.rand((b,) if weights == "row" else (b, t_), generator=gen).to(DEVICE)
    _assert_fused_matches_reference(problem, kw)


def _assert_fused_matches_reference(problem, kw):
    ref, ref_grad = _run(problem, "torch", kw)
    got, grad = _run(problem, "triton", kw)
    scale = 10 * loss_magnitude(problem, {**kw, "objective": None}) + float(ref.loss.detach().abs()) + 1.0
    assert_close(got.loss, ref.loss, torch.float32, scale=scale, what=f"{problem.description} {kw}")
    assert set(got.metrics) == set(ref.metrics)
    for name in ref.metrics:
        assert_close(got.metrics[name], ref.metrics[name], torch.float32, scale=float(ref.metrics[name].abs()) + 1e-6)
    # Per token within the dtype's tolerance, relative to |surrogate gradient| + |KL gradient| (they
    # can cancel). A token exactly at a kink of the objective (a clip or trust-region bound, to the
    # last ulp) may take either one-sided derivative in two correct implementations: at most one
    # such token per drawn problem is let through, anywhere else a difference fails.
    tol = TOLERANCES[problem.dtype]
    _, surrogate_grad = _run(problem, "torch", {**kw, "beta": 0.0}) if kw.get("beta") else (None, ref_grad)
    magnitude = surrogate_grad.float().abs() + (ref_grad.float() - surrogate_grad.float()).abs()
    allowed = tol.atol + tol.rtol * (ref_grad.float().abs() + magnitude)
    bad = (grad.float() - ref_grad.float()).abs() > allowed
    assert int(bad.sum()) <= 1, f"{problem.description} {kw}: {int(bad.sum())} tokens differ"
    assert torch.all(grad[~problem.mask] == 0)


@needs_triton
def test_fused_objectives_are_deterministic():
    p = make_problem(3, 1500, torch.bfloat16, seed=2, adv_kind="token", spread=1.0)
    for objective in FUSED:
        kw = {"objective": objective, "ref_logp": p.ref_logp, "beta": 0.04, "kl": "k3+", "kl_bias_correction": True,
              "token_weights": torch.rand(3, 1500, generator=torch.Generator().manual_seed(0)).to(DEVICE),
              "aggregation": "seq_mean_token_mean" if _per_row(objective) else "token_mean"}
        a, ga = _run(p, "triton", kw)
        b, gb = _run(p, "triton", kw)
        assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb), objective
        assert all(torch.equal(a.metrics[k], b.metrics[k]) for k in a.metrics), objective


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", FUSED[1:])
def test_microbatches_with_global_counts_sum_to_the_full_batch(backend, objective):
    p = make_problem(5, 40, torch.float32, seed=6, mask_kind="empty_rows", spread=0.3, adv_kind="token")
    agg = "seq_mean_token_mean"
    kw = {"objective": objective, "ref_logp": p.ref_logp, "beta": 0.04, "aggregation": agg}
    full, full_grad = _run(p, backend, kw)
    leaf = p.fresh_logp()
    total = 0
    for lo, hi in ((0, 2), (2, 3), (3, 5)):
        out = rlloss.policy_loss(leaf[lo:hi], p.old_logp[lo:hi], p.adv[lo:hi], p.mask[lo:hi], objective=objective,
                                 ref_logp=p.ref_logp[lo:hi], beta=0.04, aggregation=agg, num_seqs=5, backend=backend)
        total = total + out.loss
    (grad,) = torch.autograd.grad(total, leaf)
    assert_close(total, full.loss, torch.float32, scale=1.0)
    assert_close(grad, full_grad, torch.float32)  # element-wise: each element comes from one micro-batch


def test_kl_cov_does_not_split_over_microbatches():
    """Its top-k selection spans the call: each micro-batch picks its own top tokens, so the sum of the
    micro-batch losses is not the full-batch loss. This documents why the split property is not claimed."""
    p = make_problem(4, 30, torch.float32, seed=7, mask_kind="full", spread=0.5, adv_kind="token")
    kw = {"objective": rlloss.KLCov(ratio=0.1, coef=5.0), "aggregation": "token_mean"}
    full = rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask, **kw).loss
    parts = sum(rlloss.policy_loss(p.logp[i:i + 2], p.old_logp[i:i + 2], p.adv[i:i + 2], p.mask[i:i + 2],
                                   num_tokens=120, **kw).loss for i in (0, 2))
    assert abs(float(parts) - float(full)) > 1e-3


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: rlloss.CISPO(high=-1.0), ValueError, "high"),
        (lambda: rlloss.CISPO(low=2.0, high=1.0), ValueError, "low"),
        (lambda: rlloss.SAPO(tau_neg=0.0), ValueError, "tau_neg"),
        (lambda: rlloss.SAPO(tau_pos=-1.0), ValueError, "tau_pos"),
        (lambda: rlloss.DRO(), ValueError, "beta"),
        (lambda: rlloss.DRO(beta=0.0), ValueError, "beta"),
        (lambda: rlloss.DPPO(divergence="js"), ValueError, "divergence"),
        (lambda: rlloss.PPO(delta=0.0), ValueError, "delta"),
        (lambda: rlloss.PPO(level="row"), ValueError, "level"),
        (lambda: rlloss.KLCov(ratio=0.0), ValueError, "ratio"),
        (lambda: rlloss.ClipCov(cov_low=5.0, cov_high=1.0), ValueError, "cov_low"),
    ],
)
def test_fields_are_checked_when_built(call, error, words):
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize(
    "kw, error, words",
    [
        ({"objective": "grpo"}, ValueError, "objective"),
        ({"objective": 3}, TypeError, "objective"),
        ({"objective": "dro"}, ValueError, "DRO"),
        ({"objective": "cispo", "eps_high": 0.28}, TypeError, "eps_high"),
        ({"objective": rlloss.SAPO(), "dual_clip": 3.0}, TypeError, "dual_clip"),
        ({"objective": "gmpo", "aggregation": "token_mean"}, ValueError, "aggregation"),
        ({"token_weights": torch.ones(3)}, ValueError, "token_weights"),
        ({"token_weights": torch.ones(2, 3, requires_grad=True)}, ValueError, "token_weights"),
        ({"kl": "k4"}, ValueError, "kl"),
        ({"objective": "kl_cov", "backend": "triton"}, ValueError, "triton"),
    ],
)
def test_policy_loss_rejects(kw, error, words):
    if kw.get("backend") == "triton" and not triton_runs_here():
        pytest.skip("the triton backend cannot run here")
    logp = torch.zeros(2, 3, device=DEVICE)
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and not v.requires_grad else v for k, v in kw.items()}
    with pytest.raises(error, match=words):
        rlloss.policy_loss(logp, logp, torch.ones(2, device=DEVICE), torch.ones(2, 3, dtype=torch.bool, device=DEVICE),
                           **kw)
