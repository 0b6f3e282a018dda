"""Independent oracles: every objective, KL kind, modifier and aggregation written again from SPEC.md.

Every other test of the reference compares it with the kernel, i.e. the same spec implemented twice
by the same people. Here each formula of ``shared/SPEC.md`` is written a second time, as plainly as
possible: float64, Python loops over rows and tokens, one 0-d tensor per token (so
``torch.autograd`` gives the oracle's gradient), no rlloss code and no vectorised copy of it. The
inputs are drawn so that the clips, caps, gates and clamps bind on a good share of the tokens, with
both signs of the advantage, and each test asserts that they did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import rlloss
from helpers import BACKENDS, DEVICE, assert_close, triton_runs_here

F64 = torch.float64
MLR = 20.0  # max_log_ratio, SPEC's default
# Log-ratio regions: past the -20 clamp, below PPO's and GMPO's clips, inside them, above them,
# past +20. Each drawn token takes one, with a relative jitter (so no value sits on a kink).
D_REGIONS = (-25.0, -1.2, -0.5, -0.1, 0.05, 0.45, 1.1, 24.0)
REF_REGIONS = (-24.0, -1.0, -0.3, 0.2, 0.9, 23.0)


# ----------------------------------------------------------------------------------------------
# Drawn problems
# ----------------------------------------------------------------------------------------------


@dataclass
class Problem:
    logp: torch.Tensor  # [B, T] float64
    old: torch.Tensor
    ref: torch.Tensor
    adv: torch.Tensor  # [B] or [B, T]
    mask: torch.Tensor  # [B, T] bool

    def a(self, i: int, t: int) -> float:
        return float(self.adv[i]) if self.adv.dim() == 1 else float(self.adv[i, t])


def make_problem(seed: int, b: int, t: int, *, per_token_adv: bool, probability_like: bool = False,
                 row_regions: bool = False) -> Problem:
    """B x T inputs; each log-ratio in one of ``D_REGIONS`` with a 10% jitter, advantages of both
    signs (|A| >= 0.1), a random mask with empty rows.

    ``probability_like``: ``logp < 0`` everywhere (DPPO reads ``p = exp(logp)`` as a probability),
    the old policy's probabilities spread over (0.05, 0.95) so its trust region binds.
    ``row_regions``: one region per row (GSPO and VESPO clip a row's mean or sum, not a token's).
    """
    gen = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=gen, dtype=F64)  # noqa: E731
    regions = torch.tensor(D_REGIONS, dtype=F64)
    pick = torch.randint(0, len(D_REGIONS), (b, 1) if row_regions else (b, t), generator=gen)
    d = regions[pick] * (1 + 0.1 * u(b, t)) + (0.1 * (u(b, t) - 0.5) if row_regions else 0.0)
    if probability_like:
        old = torch.log(0.05 + 0.9 * u(b, t))
        d = d.clamp(-3.0, 3.0)
        logp = torch.minimum(old + d, torch.full_like(old, -1e-3) - 1e-3 * u(b, t))
    else:
        old = -6 * u(b, t) - 1e-3
        logp = old + d
    ref_regions = torch.tensor(REF_REGIONS, dtype=F64)
    ref = logp + ref_regions[torch.randint(0, len(REF_REGIONS), (b, t), generator=gen)] * (1 + 0.1 * u(b, t))
    signs = torch.where(u(b, t) < 0.5, -1.0, 1.0).to(F64)
    adv = signs * (0.1 + 2 * u(b, t)) if per_token_adv else signs[:, 0] * (0.1 + 2 * u(b))
    mask = u(b, t) < 0.75
    mask[u(b) < 0.2] = False  # empty rows
    return Problem(logp, old, ref, adv, mask)


@st.composite
def problems(draw: st.DrawFn, name: str) -> Problem:
    """B in 1..4, T in 1..8, per-sequence or per-token advantages (per token for KL-Cov, whose
    top-k would otherwise tie: one advantage per row gives whole rows the same covariance)."""
    _, _, draws = CASES[name]
    per_token = True if name == "kl_cov" else draw(st.booleans(), label="per-token advantages")
    return make_problem(draw(st.integers(0, 2**31 - 1), label="seed"), draw(st.integers(1, 4), label="B"),
                        draw(st.integers(1, 8), label="T"), per_token_adv=per_token, **draws)


@st.composite
def modifiers(draw: st.DrawFn, per_row: bool) -> dict:
    b_seqs = draw(st.sampled_from([None, 3, 7.5]), label="num_seqs")
    return {
        "aggregation": "seq_mean_token_mean" if per_row else draw(st.sampled_from(
            ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant", "token_sum"]), label="aggregation"),
        "beta": draw(st.sampled_from([0.0, 0.04, 0.7]), label="beta"),
        "kl": draw(st.sampled_from(["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"]), label="kl"),
        "kl_bias_correction": draw(st.booleans(), label="kl_bias_correction"),
        "token_weights": draw(st.sampled_from([None, "row", "token"]), label="token_weights"),
        "num_tokens": draw(st.sampled_from([None, 5, 40.0]), label="num_tokens"),
        "num_seqs": b_seqs,
        "max_tokens": 9,
        "dp_size": draw(st.sampled_from([1, 3]), label="dp_size"),
    }


# ----------------------------------------------------------------------------------------------
# Scalar helpers, each with torch's gradient convention spelled out
# ----------------------------------------------------------------------------------------------


def v(x: torch.Tensor) -> float:
    """The value of a 0-d tensor, for a comparison that decides a branch (not differentiated)."""
    return x.detach().item()


def const(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def clamp(x: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    """torch.clamp on a 0-d tensor: the bound (a constant, gradient 0) where it binds, x elsewhere."""
    if lo is not None and x < lo:
        return const(lo)
    if hi is not None and x > hi:
        return const(hi)
    return x


def smaller(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """min of two 0-d tensors. Where they tie the drawn problems make both branches' gradients equal."""
    return a if a <= b else b


def larger(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a if a >= b else b


class Binds:
    """Counts the valid tokens where a clip, cap, gate or clamp of the objective changed something."""

    def __init__(self) -> None:
        self.count = 0
        self.ambiguous = False  # the objective's selection is not fixed by SPEC here (a tie)
        self.magnitude = 0.0  # sum over valid tokens of |weighted surrogate| + |KL term|

    def __call__(self, happened: bool) -> None:
        self.count += int(bool(happened))


# ----------------------------------------------------------------------------------------------
# The objectives, per token, from SPEC "Per-token surrogate" and "Beyond PPO"
# ----------------------------------------------------------------------------------------------


def ppo_token(lp, old, a, *, eps_low=0.2, eps_high=None, dual_clip=None, delta=None, seq_mean=None, binds):
    hi = eps_low if eps_high is None else eps_high
    d = lp - old if seq_mean is None else lp - lp.detach() + seq_mean  # GSPO: sg(row mean), own gradient
    dc = clamp(d, -MLR, MLR)
    r = torch.exp(dc)
    unclipped = r if delta is None else clamp(r, None, delta)
    clipped = clamp(r, 1 - eps_low, 1 + hi)
    loss = -smaller(unclipped * a, clipped * a)
    bound = abs(v(d)) > MLR or (a > 0 and v(r) > 1 + hi) or (a < 0 and v(r) < 1 - eps_low)
    bound = bound or (delta is not None and a > 0 and v(r) > delta)
    if dual_clip is not None and a < 0:
        bound = bound or v(loss) > -dual_clip * a
        loss = smaller(loss, const(-dual_clip * a))
    binds(bound)
    return loss


def cispo_token(lp, old, a, *, low=None, high=5.0, binds):
    r = torch.exp(clamp(lp - old, -MLR, MLR))
    w = clamp(r, low, high).detach()
    binds(v(w) != v(r))
    return -w * a * lp


def sapo_token(lp, old, a, *, tau_pos=1.0, tau_neg=1.05, binds):
    r = torch.exp(clamp(lp - old, -MLR, MLR))
    tau = tau_pos if a > 0 else tau_neg
    gate = torch.sigmoid(tau * (r - 1))
    binds(abs(v(r) - 1) > 0.2)  # where PPO's clip would cut the gradient, SAPO's gate damps it
    return -a * (4 / tau) * gate


def reinforce_token(lp, old, a, *, binds):
    binds(a < 0)  # nothing to bind: count the negative advantages (both signs must be drawn)
    return -a * lp


def dppo_token(lp, old, a, *, divergence="tv", low=0.2, high=0.2, weight_cap=3.0, binds):
    r = torch.exp(clamp(lp - old, -MLR, MLR))
    w = clamp(r, None, weight_cap).detach()
    p, q = math.exp(v(lp)), math.exp(old)
    if divergence == "tv":
        ok_pos, ok_neg = p - q <= high, p - q >= -low
    else:
        bkl = q * (old - v(lp)) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))
        ok_pos, ok_neg = bkl <= high or p <= q, bkl <= low or p >= q
    ok = ok_pos if a > 0 else ok_neg
    binds(not ok)
    return -a * w * float(ok) * lp


def dro_token(lp, old, a, *, beta, binds):
    d = lp - old  # unclamped
    binds(abs(v(d)) > MLR)
    return -(a * lp - beta / 2 * d * d)


def kl_token(lp, ref, kind):
    """SPEC "KL estimators" and the modifiers' list: k1, k2, k3 (input clamped ±20), abs, and the
    ``+`` kinds: the base's value with k2's gradient."""
    if kind.endswith("+"):
        k2 = kl_token(lp, ref, "k2")
        return k2 - k2.detach() + kl_token(lp, ref, kind[:-1]).detach()
    if kind == "k1":
        return lp - ref
    if kind == "k2":
        return (lp - ref) ** 2 / 2
    if kind == "abs":
        return torch.abs(lp - ref)
    x = clamp(ref - lp, -20.0, 20.0)
    return torch.exp(x) - x - 1


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------


def oracle_loss(pb: Problem, leaf: torch.Tensor, objective: str, params: dict, mods: dict, weights, binds: Binds,
                per_token_out: dict | None = None):
    """SPEC's ``policy_loss`` for ``objective`` (a name of this file) with ``params``, token by token;
    ``per_token_out`` (a dict) receives each valid token's loss, keyed ``(i, t)`` (GMPO: each row's, ``i``)."""
    B, T = pb.mask.shape
    m = [[bool(pb.mask[i, t]) for t in range(T)] for i in range(B)]
    n = [sum(row) for row in m]
    n_valid = sum(n)
    lp = [[leaf[i, t] for t in range(T)] for i in range(B)]
    old = [[float(pb.old[i, t]) for t in range(T)] for i in range(B)]
    ref = [[float(pb.ref[i, t]) for t in range(T)] for i in range(B)]
    a = [[pb.a(i, t) for t in range(T)] for i in range(B)]
    sequence_level = objective == "gspo"

    def w_token(i, t):
        if weights is None:
            return 1.0
        return float(weights[i]) if weights.dim() == 1 else float(weights[i, t])

    def kl_term(i, t):
        value = kl_token(lp[i][t], ref[i][t], mods["kl"])
        if mods["kl_bias_correction"]:
            if sequence_level:  # the row's mean log-ratio, gradient through it (not detached)
                s = sum((lp[i][u] - old[i][u] for u in range(T) if m[i][u]), const(0.0)) / max(n[i], 1)
                value = value * torch.exp(clamp(s, -MLR, MLR))
            else:
                value = value * torch.exp(clamp(lp[i][t] - old[i][t], -MLR, MLR))
        return value

    use_kl = mods["beta"] != 0
    zero = const(0.0)

    if objective == "gmpo":  # per row: l_i = -Abar_i * rho_i
        total = zero
        for i in range(B):
            if n[i] == 0:
                continue
            log_rho, abar = zero, 0.0
            for t in range(T):
                if not m[i][t]:
                    continue
                s = math.copysign(1.0, a[i][t]) if a[i][t] != 0 else 0.0
                dc = clamp(lp[i][t] - old[i][t], -MLR, MLR)
                dl = clamp(dc, -params["log_clip_low"], params["log_clip_high"])
                dm = s * smaller(s * dc, s * dl)
                binds(v(dm) != v(lp[i][t]) - old[i][t])
                log_rho = log_rho + dm
                abar += a[i][t]
            row = -(abar / n[i]) * torch.exp(log_rho / n[i])
            if per_token_out is not None:
                per_token_out[i] = row
            if weights is not None:
                wi = (float(weights[i]) if weights.dim() == 1 else
                      math.exp(sum(math.log(float(weights[i, t]) + 1e-10) for t in range(T) if m[i][t]) / n[i]))
                row = row * wi
            if use_kl:
                row = row + sum((mods["beta"] * kl_term(i, t) for t in range(T) if m[i][t]), zero) / n[i]
            total = total + row
        n_seq = B if mods["num_seqs"] is None else mods["num_seqs"]
        return (total / n_seq if n_seq else zero) * mods["dp_size"]

    # covariance over the valid tokens of the call (KL-Cov, Clip-Cov), detached
    cov = {}
    if n_valid and objective in ("kl_cov", "clip_cov"):
        mean_a = sum(a[i][t] for i in range(B) for t in range(T) if m[i][t]) / n_valid
        mean_lp = sum(v(lp[i][t]) for i in range(B) for t in range(T) if m[i][t]) / n_valid
        cov = {(i, t): (a[i][t] - mean_a) * (v(lp[i][t]) - mean_lp)
               for i in range(B) for t in range(T) if m[i][t]}
    selected: set = set()
    if objective == "kl_cov" and n_valid:
        k = max(1, int(n_valid * params["ratio"]))
        ranked = sorted(cov, key=lambda key: cov[key], reverse=True)
        selected = set(ranked[:k])
        # a tie at the k-th place leaves the choice open (SPEC does not order ties); with two valid
        # tokens the two covariances are always equal
        binds.ambiguous = k < n_valid and math.isclose(cov[ranked[k - 1]], cov[ranked[k]], rel_tol=1e-9)
    if objective == "clip_cov":  # ratio = 1 below: every candidate is drawn, whatever the generator
        assert params["ratio"] == 1.0

    seq_means = [sum(v(lp[i][t]) - old[i][t] for t in range(T) if m[i][t]) / max(n[i], 1) for i in range(B)]
    per_token = {}
    for i in range(B):
        for t in range(T):
            if not m[i][t]:
                continue
            x, o, ai = lp[i][t], old[i][t], a[i][t]
            if objective in ("ppo", "ppo_delta_dual", "gspo"):
                surrogate = ppo_token(x, o, ai, binds=binds, seq_mean=seq_means[i] if sequence_level else None,
                                      **params)
            elif objective == "cispo":
                surrogate = cispo_token(x, o, ai, binds=binds, **params)
            elif objective == "sapo":
                surrogate = sapo_token(x, o, ai, binds=binds, **params)
            elif objective == "reinforce":
                surrogate = reinforce_token(x, o, ai, binds=binds)
            elif objective in ("dppo_tv", "dppo_kl"):
                surrogate = dppo_token(x, o, ai, binds=binds, **params)
            elif objective == "dro":
                surrogate = dro_token(x, o, ai, binds=binds, **params)
            elif objective == "vespo":
                s = sum(v(clamp(lp[i][u] - old[i][u], -MLR, MLR)) for u in range(T) if m[i][u])
                lw = min(max(s, math.log(1e-8)), 20.0)
                k, lam = ((params["k_pos"], params["lam_pos"]) if ai >= 0 else (params["k_neg"], params["lam_neg"]))
                lam = max(lam, 1e-4)
                phi = math.exp(lam + k * lw - lam * math.exp(lw))
                binds(lw != s or phi < 0.5)  # the row's sum is clamped, or its weight cuts the gradient
                surrogate = -phi * ai * x
            elif objective == "kl_cov":
                surrogate = -ai * torch.exp(clamp(x - o, -MLR, MLR))
                if (i, t) in selected:
                    surrogate = surrogate + params["coef"] * torch.abs(x - o)
                binds((i, t) in selected)
            elif objective == "clip_cov":
                r = torch.exp(clamp(x - o, -MLR, MLR))
                l1 = -ai * r
                l2 = -ai * clamp(r, 1 - params["eps_low"], 1 + params.get("eps_high", params["eps_low"]))
                candidate = v(l2) <= v(l1) and params["cov_low"] < cov[(i, t)] < params["cov_high"]
                binds(candidate)
                surrogate = zero if candidate else larger(l1, l2)
            else:
                raise AssertionError(objective)
            loss = w_token(i, t) * surrogate
            binds.magnitude += abs(v(loss))
            if use_kl:
                kl = mods["beta"] * kl_term(i, t)
                binds.magnitude += abs(v(kl))
                loss = loss + kl
            per_token[i, t] = loss

    if per_token_out is not None:
        per_token_out.update(per_token)
    agg = mods["aggregation"]
    total = sum(per_token.values(), zero)
    n_seq = B if mods["num_seqs"] is None else mods["num_seqs"]
    if agg == "token_mean":
        n_tok = n_valid if mods["num_tokens"] is None else mods["num_tokens"]
        out = total / n_tok if n_tok else zero
    elif agg == "seq_mean_token_mean":
        rows = sum((sum((per_token[i, t] for t in range(T) if m[i][t]), zero) / n[i] for i in range(B) if n[i]),
                   zero)
        out = rows / n_seq if n_seq else zero
    elif agg == "seq_mean_token_sum":
        out = total / n_seq if n_seq else zero
    elif agg == "constant":
        out = total / (n_seq * mods["max_tokens"]) if n_seq else zero
    else:
        out = total
    return out * mods["dp_size"]


# name -> (rlloss objective, the oracle's parameters, make_problem's options). Parameters are chosen
# so that the clips and gates bind for the drawn log-ratios.
CASES = {
    "ppo": (rlloss.PPO(eps_low=0.2, eps_high=0.28), {"eps_low": 0.2, "eps_high": 0.28}, {}),
    "ppo_delta_dual": (rlloss.PPO(eps_low=0.2, dual_clip=3.0, delta=1.5),
                       {"eps_low": 0.2, "dual_clip": 3.0, "delta": 1.5}, {}),
    "gspo": (rlloss.PPO(eps_low=0.1, eps_high=0.15, level="sequence"), {"eps_low": 0.1, "eps_high": 0.15},
             {"row_regions": True}),
    "cispo": (rlloss.CISPO(low=0.8, high=1.3), {"low": 0.8, "high": 1.3}, {}),
    "sapo": (rlloss.SAPO(tau_pos=1.0, tau_neg=1.05), {"tau_pos": 1.0, "tau_neg": 1.05}, {}),
    "reinforce": (rlloss.Reinforce(), {}, {}),
    "dppo_tv": (rlloss.DPPO(divergence="tv", low=0.1, high=0.15, weight_cap=2.0),
                {"divergence": "tv", "low": 0.1, "high": 0.15, "weight_cap": 2.0}, {"probability_like": True}),
    "dppo_kl": (rlloss.DPPO(divergence="kl", low=0.03, high=0.3, weight_cap=2.0),
                {"divergence": "kl", "low": 0.03, "high": 0.3, "weight_cap": 2.0}, {"probability_like": True}),
    "dro": (rlloss.DRO(beta=0.3), {"beta": 0.3}, {}),
    "vespo": (rlloss.VESPO(k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0),
              {"k_pos": 2.0, "lam_pos": 3.0, "k_neg": 3.0, "lam_neg": 2.0}, {"row_regions": True}),
    "gmpo": (rlloss.GMPO(log_clip_low=0.4, log_clip_high=0.3), {"log_clip_low": 0.4, "log_clip_high": 0.3}, {}),
    "kl_cov": (rlloss.KLCov(ratio=0.3, coef=0.5), {"ratio": 0.3, "coef": 0.5}, {}),
    "clip_cov": (rlloss.ClipCov(ratio=1.0, cov_low=-0.5, cov_high=2.0, eps_low=0.2),
                 {"ratio": 1.0, "cov_low": -0.5, "cov_high": 2.0, "eps_low": 0.2}, {}),
}
# Shares of valid tokens that bind, at least (the drawn distribution gives more; see the test).
MIN_BIND_SHARE = {"reinforce": 0.3, "dro": 0.1, "kl_cov": 0.25, "clip_cov": 0.15}


def check_policy_loss(name: str, pb: Problem, mods: dict) -> bool:
    """``policy_loss`` (reference) against the oracle, loss and gradient; False (nothing checked) where
    the oracle's selection is a tie SPEC leaves open."""
    objective, params, _ = CASES[name]
    B, T = pb.mask.shape
    gen = torch.Generator().manual_seed(B * 31 + T)
    weights = {None: None, "row": 0.5 + torch.rand(B, generator=gen, dtype=F64),
               "token": 0.5 + torch.rand(B, T, generator=gen, dtype=F64)}[mods["token_weights"]]

    leaf = pb.logp.clone().requires_grad_(True)
    binds = Binds()
    expected = oracle_loss(pb, leaf, name, params, mods, weights, binds)
    if binds.ambiguous:
        return False
    expected_grad = (torch.autograd.grad(expected, leaf, allow_unused=True, materialize_grads=True)[0]
                     if expected.requires_grad else torch.zeros_like(leaf))  # every token clipped: no path

    kw = {k: mods[k] for k in ("aggregation", "beta", "kl", "kl_bias_correction", "num_tokens", "num_seqs",
                               "dp_size")}
    if mods["aggregation"] == "constant":
        kw["max_tokens"] = mods["max_tokens"]
    leaf = pb.logp.clone().to(DEVICE).requires_grad_(True)
    out = rlloss.policy_loss(leaf, pb.old.to(DEVICE), pb.adv.to(DEVICE), pb.mask.to(DEVICE), objective=objective,
                             ref_logp=pb.ref.to(DEVICE), token_weights=None if weights is None else weights.to(DEVICE),
                             backend="torch", **kw)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    what = f"{name} {mods} B={B} T={T} mask={pb.mask.tolist()}"
    assert_close(out.loss.detach().cpu(), expected.detach(), F64, what=f"loss: {what}")
    assert_close(grad.cpu(), expected_grad, F64, what=f"gradient: {what}")
    return True


@pytest.mark.parametrize("name", list(CASES))
@given(data=st.data())
def test_policy_loss_matches_the_oracle(name, data):
    pb = data.draw(problems(name), label="problem")
    mods = data.draw(modifiers(per_row=name == "gmpo"), label="modifiers")
    assume(check_policy_loss(name, pb, mods))


# Written-out cases, whatever hypothesis draws: every aggregation with and without its count, every KL kind
# with and without bias correction, token weights per row and per token, dp_size. (aggregation, beta, kl,
# kl_bias_correction, token_weights, num_tokens, num_seqs, dp_size)
FIXED_MODS = [
    ("token_mean", 0.04, "k3", False, None, 40.0, None, 3),
    ("seq_mean_token_mean", 0.7, "k2", True, "row", None, 7.5, 1),
    ("seq_mean_token_sum", 0.04, "k1+", False, "token", None, 3, 3),
    ("constant", 0.7, "k3+", True, "token", None, None, 1),
    ("token_sum", 0.04, "abs", True, None, None, None, 3),
    ("token_mean", 0.7, "k1", False, "row", 5, None, 1),
    ("seq_mean_token_mean", 0.04, "abs+", False, "token", None, None, 1),
]


def fixed_mods(k: int, per_row: bool) -> dict:
    names = ("aggregation", "beta", "kl", "kl_bias_correction", "token_weights", "num_tokens", "num_seqs", "dp_size")
    mods = {**dict(zip(names, FIXED_MODS[k])), "max_tokens": 9}
    if per_row:  # GMPO: its one aggregation
        mods["aggregation"] = "seq_mean_token_mean"
    return mods


@pytest.mark.parametrize("k", range(len(FIXED_MODS)))
@pytest.mark.parametrize("name", list(CASES))
def test_policy_loss_matches_the_oracle_fixed(name, k):
    """The property above on written-out problems (B=4, T=8, an empty row) and modifiers."""
    _, _, draws = CASES[name]
    seed = 100 + k
    pb = make_problem(seed, 4, 8, per_token_adv=k % 2 == 1 or name == "kl_cov", **draws)
    pb.mask[2] = False  # an empty row: N_seq counts it, the seq-mean modes' rows do not
    assert check_policy_loss(name, pb, fixed_mods(k, name == "gmpo")), "a tie in KL-Cov's selection: another seed"


# The fused kernel runs these (KL-Cov and Clip-Cov are the reference's alone).
FUSED = [name for name in CASES if name not in ("kl_cov", "clip_cov")]


def check_fused_kernel(name: str, pb32: Problem, mods: dict) -> bool:
    """The fused kernel against the oracle on ``pb32`` rounded to fp32; False where the oracle is ambiguous."""
    objective, _, _ = CASES[name]
    pb = Problem(*(x.float().double() if x.is_floating_point() else x
                   for x in (pb32.logp, pb32.old, pb32.ref, pb32.adv, pb32.mask)))
    expected, leaf, binds = run_oracle(name, pb, mods)
    if binds.ambiguous:
        return False
    grad_of = lambda loss, x: (torch.autograd.grad(loss, x, allow_unused=True, materialize_grads=True)[0]  # noqa: E731
                               if loss.requires_grad else torch.zeros_like(x))
    expected_grad = grad_of(expected, leaf)
    surrogate, leaf_s, _ = run_oracle(name, pb, {**mods, "beta": 0.0})
    surrogate_grad = grad_of(surrogate, leaf_s)
    magnitude = surrogate_grad.abs() + (expected_grad - surrogate_grad).abs()

    f32 = lambda x: x.float().to(DEVICE)  # noqa: E731
    x = f32(pb.logp).requires_grad_(True)
    out = rlloss.policy_loss(x, f32(pb.old), f32(pb.adv), pb.mask.to(DEVICE), objective=objective,
                             ref_logp=f32(pb.ref), aggregation=mods["aggregation"], beta=mods["beta"], kl=mods["kl"],
                             kl_bias_correction=mods["kl_bias_correction"], backend="triton")
    (grad,) = torch.autograd.grad(out.loss, x)
    what = f"{name} {mods} mask={pb.mask.tolist()}"
    assert_close(out.loss.detach().double().cpu(), expected.detach(), torch.float32, scale=binds.magnitude,
                 what=f"loss: {what}")
    assert_close(grad.double().cpu(), expected_grad, torch.float32, scale=magnitude, what=f"gradient: {what}")
    return True


def fused_mods(name: str, beta: float, kl: str, kl_bias_correction: bool) -> dict:
    """``token_sum`` so the loss is a plain sum (GMPO, per row: ``seq_mean_token_mean``, its only aggregation)."""
    aggregation = "seq_mean_token_mean" if name == "gmpo" else "token_sum"
    return {"aggregation": aggregation, "beta": beta, "kl": kl, "kl_bias_correction": kl_bias_correction,
            "num_tokens": None, "num_seqs": None, "max_tokens": 9, "dp_size": 1}


@pytest.mark.skipif(not triton_runs_here(), reason="needs triton with a CUDA device or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", FUSED)
@given(data=st.data())
def test_fused_kernel_matches_the_oracle(name, data):
    """The kernel against the oracle, not against the reference: fp32 inputs (the oracle reads the
    same rounded values in float64). The loss is compared relative to the sum of |terms|, each
    gradient element relative to |surrogate part| + |KL part|."""
    pb32 = data.draw(problems(name), label="problem")
    mods = fused_mods(name, data.draw(st.sampled_from([0.0, 0.04]), label="beta"),
                      data.draw(st.sampled_from(["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"]), label="kl"),
                      data.draw(st.booleans(), label="kl_bias_correction"))
    assume(check_fused_kernel(name, pb32, mods))


@pytest.mark.skipif(not triton_runs_here(), reason="needs triton with a CUDA device or TRITON_INTERPRET=1")
@pytest.mark.parametrize("beta, kl, kl_bias_correction", [(0.0, "k3", False), (0.04, "k2", True), (0.04, "k3+", False)])
@pytest.mark.parametrize("name", FUSED)
def test_fused_kernel_matches_the_oracle_fixed(name, beta, kl, kl_bias_correction):
    """The property above on written-out problems, per-token and per-row advantages."""
    _, _, draws = CASES[name]
    pb = make_problem(200 + len(kl) + int(kl_bias_correction), 4, 8, per_token_adv=kl_bias_correction, **draws)
    assert check_fused_kernel(name, pb, fused_mods(name, beta, kl, kl_bias_correction))


# Each public per-token function with every field off its default: (function, its keywords, the oracle's
# objective and parameters, make_problem's options)
SURROGATE_FUNCTIONS = {
    "clipped_surrogate": (rlloss.clipped_surrogate, dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0, delta=1.5),
                          "ppo_delta_dual", dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0, delta=1.5), {}),
    # delta = 1.5 caps a negative advantage's loss before the dual clip 3 could: the dual clip alone here
    "clipped_surrogate-dual_clip": (rlloss.clipped_surrogate, dict(eps_low=0.1, eps_high=0.2, dual_clip=2.0), "ppo",
                                    dict(eps_low=0.1, eps_high=0.2, dual_clip=2.0), {}),
    "clipped_surrogate-sequence": (rlloss.clipped_surrogate, dict(eps_low=0.1, eps_high=0.15, level="sequence"),
                                   "gspo", dict(eps_low=0.1, eps_high=0.15), {"row_regions": True}),
    "cispo_surrogate": (rlloss.cispo_surrogate, dict(low=0.8, high=1.3), "cispo", dict(low=0.8, high=1.3), {}),
    "sapo_surrogate": (rlloss.sapo_surrogate, dict(tau_pos=0.7, tau_neg=1.4), "sapo", dict(tau_pos=0.7, tau_neg=1.4),
                       {}),
    "reinforce_surrogate": (rlloss.reinforce_surrogate, {}, "reinforce", {}, {}),
    "dppo_surrogate-tv": (rlloss.dppo_surrogate, dict(divergence="tv", low=0.1, high=0.15, weight_cap=2.0), "dppo_tv",
                          dict(divergence="tv", low=0.1, high=0.15, weight_cap=2.0), {"probability_like": True}),
    "dppo_surrogate-kl": (rlloss.dppo_surrogate, dict(divergence="kl", low=0.03, high=0.3, weight_cap=1.5), "dppo_kl",
                          dict(divergence="kl", low=0.03, high=0.3, weight_cap=1.5), {"probability_like": True}),
    "dro_surrogate": (rlloss.dro_surrogate, dict(beta=0.3), "dro", dict(beta=0.3), {}),
    "vespo_surrogate": (rlloss.vespo_surrogate, dict(k_pos=2.5, lam_pos=3.5, k_neg=1.5, lam_neg=2.0), "vespo",
                        dict(k_pos=2.5, lam_pos=3.5, k_neg=1.5, lam_neg=2.0), {"row_regions": True}),
    "gmpo_surrogate": (rlloss.gmpo_surrogate, dict(log_clip_low=0.4, log_clip_high=0.3), "gmpo",
                       dict(log_clip_low=0.4, log_clip_high=0.3), {}),
    "kl_cov_surrogate": (rlloss.kl_cov_surrogate, dict(ratio=0.3, coef=0.5), "kl_cov", dict(ratio=0.3, coef=0.5), {}),
    "clip_cov_surrogate": (rlloss.clip_cov_surrogate, dict(ratio=1.0, cov_low=-0.5, cov_high=2.0, eps_low=0.2,
                                                           eps_high=0.3),
                           "clip_cov", dict(ratio=1.0, cov_low=-0.5, cov_high=2.0, eps_low=0.2, eps_high=0.3), {}),
}
REFERENCE_ONLY_SURROGATES = ("gmpo_surrogate", "kl_cov_surrogate", "clip_cov_surrogate")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("function", list(SURROGATE_FUNCTIONS))
def test_surrogate_functions_match_the_oracle_per_token(function, backend):
    """Every public ``*_surrogate`` function with each of its fields off the default: per-token loss (GMPO: per
    row) and the gradient of a weighted sum of it, against the oracle's tokens."""
    fn, kwargs, name, params, draws = SURROGATE_FUNCTIONS[function]
    pb = make_problem(300 + len(function), 4, 8, per_token_adv=name == "kl_cov", **draws)
    if backend == "triton" and function in REFERENCE_ONLY_SURROGATES:
        # reference only (a per-row loss, or a selection over the whole call): refused by name, never a silent
        # fallback to the reference
        with pytest.raises(ValueError, match='backend="triton" does not run'):
            fn(*(x.to(DEVICE, torch.float32) for x in (pb.logp, pb.old, pb.adv)), pb.mask.to(DEVICE), **kwargs,
               backend=backend)
        return
    pb.mask[1, :3] = True  # no empty row: every row has a value to compare
    leaf = pb.logp.clone().requires_grad_(True)
    tokens: dict = {}
    binds = Binds()
    mods = {"aggregation": "token_sum", "beta": 0.0, "kl": "k3", "kl_bias_correction": False, "num_tokens": None,
            "num_seqs": None, "max_tokens": 9, "dp_size": 1}
    oracle_loss(pb, leaf, name, params, mods, None, binds, per_token_out=tokens)
    assert not binds.ambiguous and binds.count > 0  # something binds: the fields matter here
    B, T = pb.mask.shape
    gen = torch.Generator().manual_seed(5)
    cot = torch.rand(B if name == "gmpo" else (B, T), generator=gen, dtype=F64) + 0.5
    zero = const(0.0)
    if name == "gmpo":
        want = torch.stack([tokens.get(i, zero) for i in range(B)])
    else:
        want = torch.stack([torch.stack([tokens.get((i, t), zero) for t in range(T)]) for i in range(B)])
    weighted = (want * cot).sum()
    want_grad = (torch.autograd.grad(weighted, leaf, allow_unused=True, materialize_grads=True)[0]
                 if weighted.requires_grad else torch.zeros_like(leaf))
    dtype = F64 if backend == "torch" else torch.float32
    x = pb.logp.to(DEVICE, dtype).requires_grad_(True)
    got = fn(x, pb.old.to(DEVICE, dtype), pb.adv.to(DEVICE, dtype), pb.mask.to(DEVICE), backend=backend, **kwargs)
    (grad,) = torch.autograd.grad((got * cot.to(got)).sum(), x)
    tol = F64 if backend == "torch" else torch.float32
    assert_close(got.detach().double().cpu(), want.detach(), tol, scale=float(want.detach().abs().max()), what=function)
    assert_close(grad.double().cpu(), want_grad, tol, scale=float(want_grad.abs().max()), what=f"d {function}")


def run_oracle(name: str, pb: Problem, mods: dict, weights=None) -> tuple[torch.Tensor, torch.Tensor, Binds]:
    leaf = pb.logp.clone().requires_grad_(True)
    binds = Binds()
    loss = oracle_loss(pb, leaf, name, CASES[name][1], mods, weights, binds)
    return loss, leaf, binds


@pytest.mark.parametrize("name", list(CASES))
def test_the_oracle_draws_bind_the_clips(name):
    """Over 40 problems of the oracle test's distribution a fair share of the valid tokens sit where
    the objective's clip, cap, gate, clamp or selection changes the loss (for REINFORCE and DRO,
    which have none: negative advantages and the unclamped tails), both signs of A included."""
    _, _, draws = CASES[name]
    mods = {"aggregation": "seq_mean_token_mean", "beta": 0.0, "kl": "k3", "kl_bias_correction": False,
            "num_tokens": None, "num_seqs": None, "max_tokens": 9, "dp_size": 1}
    bound = valid = positive = negative = 0
    for seed in range(40):
        pb = make_problem(seed, 4, 8, per_token_adv=seed % 2 == 0 or name == "kl_cov", **draws)
        _, _, binds = run_oracle(name, pb, mods)
        bound, valid = bound + binds.count, valid + int(pb.mask.sum())
        signs = torch.sign(pb.adv if pb.adv.dim() == 2 else pb.adv[:, None].expand_as(pb.mask))[pb.mask]
        positive, negative = positive + int((signs > 0).sum()), negative + int((signs < 0).sum())
    assert bound >= MIN_BIND_SHARE.get(name, 0.25) * valid, f"{name}: only {bound} of {valid} valid tokens bind"
    assert positive >= 0.3 * valid and negative >= 0.3 * valid


def test_clip_cov_zeroes_exactly_k_of_its_candidates():
    """With ``ratio < 1`` the drawn candidates depend on the generator; what SPEC fixes: exactly
    ``min(max(int(ratio*N), 1), #candidates)`` candidates get 0, every other valid token ``max(l1, l2)``."""
    ratio, cov_low, cov_high, eps = 0.1, -0.5, 2.0, 0.2
    for seed in range(6):
        pb = make_problem(seed, 4, 8, per_token_adv=True)
        out = rlloss.clip_cov_surrogate(pb.logp, pb.old, pb.adv, pb.mask, ratio=ratio, cov_low=cov_low,
                                        cov_high=cov_high, eps_low=eps, backend="torch")
        B, T = pb.mask.shape
        valid = [(i, t) for i in range(B) for t in range(T) if pb.mask[i, t]]
        if not valid:
            continue
        mean_a = sum(pb.a(i, t) for i, t in valid) / len(valid)
        mean_lp = sum(float(pb.logp[i, t]) for i, t in valid) / len(valid)
        candidates, rest = [], {}
        for i, t in valid:
            r = math.exp(min(max(float(pb.logp[i, t] - pb.old[i, t]), -MLR), MLR))
            a = pb.a(i, t)
            l1, l2 = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
            cov = (a - mean_a) * (float(pb.logp[i, t]) - mean_lp)
            if l2 <= l1 and cov_low < cov < cov_high:
                candidates.append((i, t))
            rest[i, t] = max(l1, l2)
        k = min(max(int(ratio * len(valid)), 1), len(candidates))
        zeroed = [(i, t) for i, t in candidates if float(out[i, t]) == 0.0]
        assert len(zeroed) == k, (seed, len(zeroed), k)
        for (i, t), value in rest.items():
            if (i, t) not in zeroed:
                assert math.isclose(float(out[i, t]), value, rel_tol=1e-12, abs_tol=1e-12), (seed, i, t)
        assert not bool(out[~pb.mask].any())


# ----------------------------------------------------------------------------------------------
# Advantage estimators: the edge rules (singletons, ties, all-equal groups), from SPEC "Advantages"
# and "More advantage estimators"
# ----------------------------------------------------------------------------------------------


def unbiased_std(xs: list) -> torch.Tensor:
    mean = sum(xs, const(0.0)) / len(xs)
    return torch.sqrt(sum(((x - mean) ** 2 for x in xs), const(0.0)) / (len(xs) - 1))


def oracle_group_advantages(r: torch.Tensor, ids: list[int], baseline: str, scale: str, eps: float,
                            singleton: str) -> torch.Tensor:
    n = len(ids)
    rs = [r[i] for i in range(n)]
    out = []
    batch_std = unbiased_std(rs) if scale == "batch" else None
    for i in range(n):
        group = [j for j in range(n) if ids[j] == ids[i]]
        if len(group) == 1:  # no baseline: 0, or (keep) "it keeps its score" (the batch std still divides)
            if singleton == "zero":
                out.append(const(0.0))
            elif scale == "batch":
                out.append(rs[i] / (batch_std + eps))
            else:
                out.append(rs[i])
            continue
        else:
            others = group if baseline == "mean" else [j for j in group if j != i]
            b = sum((rs[j] for j in others), const(0.0)) / len(others)
            std = unbiased_std([rs[j] for j in group])
        if scale == "group":
            out.append((rs[i] - b) / (std + eps))
        elif scale == "batch":
            out.append((rs[i] - b) / (batch_std + eps))
        else:
            out.append(rs[i] - b)
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=5), seed=st.integers(0, 2**31 - 1),
       reward_kind=st.sampled_from(["binary", "few", "continuous"]),
       baseline=st.sampled_from(["mean", "loo"]), scale=st.sampled_from(["group", "batch", "none"]),
       singleton=st.sampled_from(["zero", "keep"]), eps=st.sampled_from([1e-6, 1e-4, 0.5]))
def test_group_advantages_match_the_oracle(backend, sizes, seed, reward_kind, baseline, scale, singleton, eps):
    """Groups of 1 to 5 in shuffled order; binary or few-valued rewards make ties and all-equal
    groups common. Values on both backends; float64 gradients of the reference where no std is 0
    (the derivative of a std at 0 does not exist)."""
    check_group_advantages(backend, sizes, seed, reward_kind, baseline, scale, singleton, eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("baseline, scale, singleton", [
    (baseline, scale, singleton) for baseline in ("mean", "loo") for scale in ("group", "batch", "none")
    for singleton in ("zero", "keep")])
def test_group_advantages_match_the_oracle_fixed(backend, baseline, scale, singleton):
    """The property above on written-out groups: a singleton, groups of 2 to 4 in shuffled order, a tie."""
    check_group_advantages(backend, [3, 1, 2, 4], 11, "few", baseline, scale, singleton, 1e-6)
    check_group_advantages(backend, [2, 3, 1], 12, "continuous", baseline, scale, singleton, 0.5)


def check_group_advantages(backend, sizes, seed, reward_kind, baseline, scale, singleton, eps):
    gen = torch.Generator().manual_seed(seed)
    ids = [g for g, size in enumerate(sizes) for _ in range(size)]
    order = torch.randperm(len(ids), generator=gen).tolist()
    ids = [ids[k] for k in order]
    n = len(ids)
    if scale == "batch" and n < 2:
        ids, n = ids * 2, 2 * n  # the batch std needs two rewards
    if reward_kind == "binary":
        rewards = torch.randint(0, 2, (n,), generator=gen).to(F64)
    elif reward_kind == "few":
        rewards = torch.randint(0, 3, (n,), generator=gen).to(F64) * 0.5 - 0.25
    else:
        rewards = torch.randn(n, generator=gen, dtype=F64)
    leaf = rewards.clone().requires_grad_(True)
    expected = oracle_group_advantages(leaf, ids, baseline, scale, eps, singleton)
    dtype = F64 if backend == "torch" else torch.float32
    got_leaf = rewards.to(device=DEVICE, dtype=dtype).requires_grad_(True)
    got = rlloss.group_advantages(got_leaf, torch.tensor(ids, device=DEVICE), baseline=baseline, scale=scale,
                                  eps=eps, singleton=singleton, backend=backend)
    what = f"ids={ids} rewards={rewards.tolist()}"
    assert_close(got.detach().cpu().double(), expected.detach(), F64 if backend == "torch" else torch.float32,
                 what=what)

    def std_is_zero(members: list[int]) -> bool:
        return len(members) >= 2 and len({float(rewards[j]) for j in members}) == 1

    groups = [[j for j in range(n) if ids[j] == g] for g in set(ids)]
    if (scale == "group" and any(std_is_zero(g) for g in groups)) or (scale == "batch" and std_is_zero(list(range(n)))):
        return
    if backend != "torch":  # fp32 gradients cancel (a group of two: exactly); test_kernels_advantages bounds them
        return
    cot = torch.randn(n, generator=gen, dtype=F64)
    weighted = (expected * cot).sum()
    expected_grad = (torch.autograd.grad(weighted, leaf, allow_unused=True, materialize_grads=True)[0]
                     if weighted.requires_grad else torch.zeros_like(leaf))
    (grad,) = torch.autograd.grad((got * cot.to(got)).sum(), got_leaf, allow_unused=True, materialize_grads=True)
    assert_close(grad.cpu().double(), expected_grad, F64, what=what)


def test_group_advantages_edge_rules_by_hand():
    """A singleton, an all-equal group and a tie, worked by hand (the rules, not a formula)."""
    r = torch.tensor([3.0, 1.0, 1.0, 0.0, 1.0, 2.0, 2.0], dtype=F64)
    ids = torch.tensor([0, 1, 1, 2, 2, 3, 3])  # 0: singleton; 1: all equal; 2: two values; 3: tie
    zero = rlloss.group_advantages(r, ids, scale="none", backend="torch")
    assert zero.tolist() == [0.0, 0.0, 0.0, -0.5, 0.5, 0.0, 0.0]
    keep = rlloss.group_advantages(r, ids, scale="none", singleton="keep", backend="torch")
    assert keep.tolist() == [3.0, 0.0, 0.0, -0.5, 0.5, 0.0, 0.0]
    loo = rlloss.group_advantages(r, ids, baseline="loo", scale="none", backend="torch")
    assert loo.tolist() == [0.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0]
    grpo = rlloss.group_advantages(r, ids, eps=0.0 + 1e-6, backend="torch")
    std2 = math.sqrt(0.5)  # unbiased std of {0, 1}
    torch.testing.assert_close(grpo, torch.tensor([0.0, 0.0, 0.0, -0.5 / (std2 + 1e-6), 0.5 / (std2 + 1e-6), 0.0, 0.0],
                                                  dtype=F64), rtol=1e-12, atol=0)


def oracle_passk(scores: list[float], ids: list[int], scale: str, eps: float) -> list[float]:
    out = []
    for i, s in enumerate(scores):
        group = [scores[j] for j in range(len(ids)) if ids[j] == ids[i]]
        best = max(group)
        if s != best or group.count(best) > 1:  # not the best, or a tie for the best: 0
            out.append(0.0)
            continue
        gap = best - max(x for x in group if x != best)
        if scale == "group":
            mean = sum(group) / len(group)
            gap /= math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1)) + eps
        out.append(gap)
    return out


@given(sizes=st.lists(st.integers(2, 5), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1),
       few_values=st.booleans(), scale=st.sampled_from(["group", "none"]))
def test_passk_advantages_match_the_oracle(sizes, seed, few_values, scale):
    """Only the best of a group gets ``best - second``; a tie for the best gives the whole group 0."""
    check_passk(sizes, seed, few_values, scale)


@pytest.mark.parametrize("scale", ["group", "none"])
@pytest.mark.parametrize("sizes, seed, few_values", [([4, 3, 2], 3, True), ([2, 5, 3], 4, False), ([3, 3], 8, True)])
def test_passk_advantages_match_the_oracle_fixed(sizes, seed, few_values, scale):
    check_passk(sizes, seed, few_values, scale)
    # written out: group 0 all negative (the runner-up below 0), group 1 a tie for the best, group 2 a tie below it
    ids = [0, 1, 0, 2, 1, 2, 0, 1, 2]
    scores = torch.tensor([-1.0, 2.0, -3.0, 1.0, 2.0, 1.0, -2.5, 0.5, 3.0], dtype=F64)
    check_passk_values(ids, scores, torch.ones(9, 2, dtype=torch.bool), scale)


def check_passk(sizes, seed, few_values, scale):
    gen = torch.Generator().manual_seed(seed)
    ids = [g for g, size in enumerate(sizes) for _ in range(size)]
    ids = [ids[k] for k in torch.randperm(len(ids), generator=gen).tolist()]
    n, t = len(ids), 3
    scores = (torch.randint(0, 3, (n,), generator=gen).to(F64) if few_values
              else torch.randn(n, generator=gen, dtype=F64))
    check_passk_values(ids, scores, torch.rand(n, t, generator=gen) < 0.7, scale)


def check_passk_values(ids, scores, mask, scale):
    n, t = mask.shape
    got = rlloss.passk_advantages(scores.to(DEVICE), torch.tensor(ids, device=DEVICE), mask.to(DEVICE), scale=scale)
    expected = oracle_passk(scores.tolist(), ids, scale, 1e-6)
    for i in range(n):
        for j in range(t):
            want = expected[i] if mask[i, j] else 0.0
            assert math.isclose(float(got[i, j]), want, rel_tol=1e-12, abs_tol=1e-12), (ids, scores.tolist(), i, j)
