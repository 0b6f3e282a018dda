"""Masked positions never matter, for every objective and modifier, on both backends.

NaN, +inf and -inf written at the masked positions of every ``[B, T]`` input (``logp``,
``old_logp``, ``ref_logp``, per-token ``adv`` and ``token_weights``) leave the loss, its gradient
and the metrics bitwise unchanged, and the gradient there is exactly 0. A reference that masks by
multiplying (``x * mask``) instead of selecting (``torch.where(mask, x, 0)``) turns ``0 * NaN`` into
a NaN loss or gradient, which is what this catches for each objective, KL kind and modifier.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import rlloss
from helpers import BACKENDS
from strategies import AGGREGATIONS, LossProblem, loss_problems, make_problem

# Parameters chosen so that each objective's clips, caps and gates bind at the drawn log-ratios.
OBJECTIVES: dict[str, rlloss.objectives.Objective] = {
    "ppo": rlloss.PPO(),
    "ppo_delta_dual_clip": rlloss.PPO(eps_low=0.2, eps_high=0.28, dual_clip=3.0, delta=1.5),
    "gspo": rlloss.PPO(eps_low=3e-4, eps_high=4e-4, level="sequence"),
    "cispo": rlloss.CISPO(low=0.8, high=1.2),
    "sapo": rlloss.SAPO(),
    "reinforce": rlloss.Reinforce(),
    "dppo_tv": rlloss.DPPO(divergence="tv"),
    "dppo_kl": rlloss.DPPO(divergence="kl", low=0.05, high=0.05),
    "dro": rlloss.DRO(beta=0.5),
    "vespo": rlloss.VESPO(),
    "gmpo": rlloss.GMPO(),
    "kl_cov": rlloss.KLCov(ratio=0.2),
    "clip_cov": rlloss.ClipCov(ratio=0.3, cov_low=-1.0, cov_high=5.0),
}
# Selections that span the whole call: the reference only (backend="triton" raises for them, by
# design; "auto" runs the reference).
REFERENCE_ONLY = {"kl_cov", "clip_cov"}
KL_KINDS = ("k1", "k2", "k3", "abs", "k1+", "k3+", "abs+")
POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}

CASES = [(backend, name) for backend in BACKENDS for name in OBJECTIVES
         if not (backend == "triton" and name in REFERENCE_ONLY)]


@st.composite
def modifiers(draw: st.DrawFn) -> dict:
    """KL kind and bias correction, token weights, aggregation (GMPO's own: see ``run``), and what to poison with."""
    return {
        "kl": draw(st.sampled_from(KL_KINDS)),
        "beta": draw(st.sampled_from([0.0, 0.04, 1.0])),
        "use_ref": draw(st.booleans()),
        "kl_bias_correction": draw(st.booleans()),
        "token_weights": draw(st.sampled_from([None, "row", "token"])),
        "aggregation": draw(st.sampled_from([*AGGREGATIONS, "token_sum"])),
        "poison": draw(st.sampled_from([*POISONS, "mixed"])),
    }


def poison_values(problem: LossProblem, kind: str, seed: int) -> torch.Tensor:
    """A ``[B, T]`` tensor of NaN/+inf/-inf (``"mixed"``: a random one of them per position)."""
    shape = problem.mask.shape
    if kind != "mixed":
        return torch.full(shape, POISONS[kind], device=problem.mask.device)
    pick = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(seed)).to(problem.mask.device)
    return torch.tensor(list(POISONS.values()), device=problem.mask.device)[pick]


def run(problem: LossProblem, objective, backend: str, mods: dict, weights, poison: torch.Tensor | None):
    """(loss, gradient, metrics), with ``poison`` written at the masked positions of every [B, T] input."""
    keep = problem.mask

    def spoil(x):
        if x is None or poison is None or x.dim() != 2:
            return x
        return torch.where(keep, x.detach(), poison.to(x.dtype))

    leaf = spoil(problem.logp.detach()).requires_grad_(True)
    aggregation = "seq_mean_token_mean" if isinstance(objective, rlloss.GMPO) else mods["aggregation"]
    kw = {"objective": objective, "kl": mods["kl"], "beta": mods["beta"], "aggregation": aggregation,
          "kl_bias_correction": mods["kl_bias_correction"], "token_weights": spoil(weights)}
    if aggregation == "constant":
        kw["max_tokens"] = 7
    if mods["use_ref"] or mods["beta"]:
        kw["ref_logp"] = spoil(problem.ref_logp)
    # every configuration of a fused objective runs fused (sequence-level bias correction and GMPO included)
    out = rlloss.policy_loss(leaf, spoil(problem.old_logp), spoil(problem.adv), keep, backend=backend, **kw)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    return out.loss.detach(), grad, out.metrics


def _mods(kl: str, beta: float, kl_bias_correction: bool, token_weights: str | None, aggregation: str,
          poison: str) -> dict:
    return {"kl": kl, "beta": beta, "use_ref": True, "kl_bias_correction": kl_bias_correction,
            "token_weights": token_weights, "aggregation": aggregation, "poison": poison}


@pytest.mark.parametrize("backend,name", CASES)
@given(problem=loss_problems(max_b=5, max_t=64), mods=modifiers())
# Written out, whatever hypothesis draws: a NaN reference at masked positions with k2 (its gradient 2 (logp - ref)
# is NaN there; k3's clamp hides it), every modifier on, each poison, empty rows, per-token advantages, fp16
@example(problem=make_problem(4, 9, torch.float32, seed=3, mask_kind="empty_rows", adv_kind="seq", spread=0.1),
         mods=_mods("k2", 0.04, False, None, "token_mean", "nan"))
@example(problem=make_problem(3, 17, torch.float32, seed=4, mask_kind="random", adv_kind="token", spread=1.0),
         mods=_mods("k1+", 1.0, True, "token", "seq_mean_token_mean", "mixed"))
@example(problem=make_problem(5, 8, torch.bfloat16, seed=5, mask_kind="prefix", adv_kind="seq", spread=0.1),
         mods=_mods("abs", 0.04, True, "row", "constant", "inf"))
@example(problem=make_problem(2, 30, torch.float16, seed=6, mask_kind="random", adv_kind="token", spread=30.0,
                              old_is_none=False),
         mods=_mods("k3+", 1.0, False, "token", "token_sum", "-inf"))
def test_masked_positions_never_matter_for_any_objective(backend, name, problem, mods):
    objective = OBJECTIVES[name]
    gen = torch.Generator().manual_seed(problem.logp.numel())
    b, t = problem.mask.shape
    weights = {None: None,
               "row": torch.rand(b, generator=gen) + 0.5,
               "token": torch.rand(b, t, generator=gen) + 0.5}[mods["token_weights"]]
    if weights is not None:
        weights = weights.to(device=problem.mask.device, dtype=problem.dtype)
    clean_loss, clean_grad, clean_metrics = run(problem, objective, backend, mods, weights, None)
    poison = poison_values(problem, mods["poison"], seed=b * 1000 + t)
    loss, grad, metrics = run(problem, objective, backend, mods, weights, poison)
    what = f"{name} {mods} {problem.description}"
    # (a clean fp16 gradient may overflow to inf at a ratio of e^20; never to NaN)
    assert not clean_loss.isnan() and not bool(clean_grad.isnan().any()), what
    assert torch.equal(loss, clean_loss), f"loss {loss} != {clean_loss}: {what}"
    assert torch.equal(grad, clean_grad), f"gradient changed: {what}"
    assert not bool(grad[~problem.mask].any()), f"gradient at masked positions: {what}"
    assert metrics.keys() == clean_metrics.keys()
    for key, value in metrics.items():
        assert torch.equal(value, clean_metrics[key]), f"metric {key}: {what}"
