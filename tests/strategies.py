"""Hypothesis strategies shared by the reference and kernel tests.

Shapes and options are drawn by hypothesis (so failures shrink to small, readable cases); the
tensor values come from a drawn seed through ``torch.Generator`` (drawing thousands of floats one by
one would make each example slow without finding more bugs).
"""

from __future__ import annotations

import dataclasses

import torch

import rlloss
from hypothesis import assume
from hypothesis import strategies as st

from helpers import DEVICE

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK_KINDS = ("random", "full", "prefix", "empty_rows", "all_masked")
ADV_KINDS = ("zero", "seq", "token")
# Scale of logp - old_logp: 0 (on-policy), small, typical, past the clip, past the ±20 clamp.
LOG_RATIO_SPREADS = (0.0, 1e-3, 0.1, 1.0, 30.0)


def seq_lengths() -> st.SearchStrategy[int]:
    """T from 1 to thousands, mostly small and odd sizes, sometimes long (several row chunks)."""
    return st.one_of(st.integers(1, 70), st.sampled_from([127, 128, 129, 1000, 1023, 1025]), st.integers(71, 3000))


def batch_sizes(max_b: int = 6) -> st.SearchStrategy[int]:
    return st.integers(1, max_b)


def make_mask(kind: str, b: int, t: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "full":
        return torch.ones(b, t, dtype=torch.bool)
    if kind == "all_masked":
        return torch.zeros(b, t, dtype=torch.bool)
    if kind == "prefix":  # right padding, the usual completion layout; lengths may be 0
        lengths = torch.randint(0, t + 1, (b,), generator=gen)
        return torch.arange(t)[None, :] < lengths[:, None]
    mask = torch.rand(b, t, generator=gen) < torch.rand(b, 1, generator=gen).clamp(min=0.2)
    if kind == "empty_rows":
        mask[torch.rand(b, generator=gen) < 0.5] = False
    return mask


@dataclasses.dataclass
class LossProblem:
    """The inputs of ``policy_loss`` on ``DEVICE``; ``logp`` is a leaf that requires grad."""

    logp: torch.Tensor
    old_logp: torch.Tensor | None
    adv: torch.Tensor
    mask: torch.Tensor
    ref_logp: torch.Tensor
    description: str

    @property
    def dtype(self) -> torch.dtype:
        return self.logp.dtype

    def fresh_logp(self) -> torch.Tensor:
        return self.logp.detach().clone().requires_grad_(True)


def make_problem(b: int, t: int, dtype: torch.dtype, seed: int, mask_kind: str = "random", adv_kind: str = "seq",
                 spread: float = 0.3, old_is_none: bool = False) -> LossProblem:
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=gen) * 6 - 1e-3
    old = logp + torch.randn(b, t, generator=gen) * spread
    ref = logp + torch.randn(b, t, generator=gen) * max(spread, 0.05)
    if adv_kind == "zero":
        adv = torch.zeros(b)
    elif adv_kind == "seq":
        adv = torch.randn(b, generator=gen)
    else:
        adv = torch.randn(b, t, generator=gen)
    mask = make_mask(mask_kind, b, t, gen)

    def put(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype=dtype, device=DEVICE)

    return LossProblem(
        logp=put(logp).requires_grad_(True),
        old_logp=None if old_is_none else put(old),
        adv=put(adv),
        mask=mask.to(DEVICE),
        ref_logp=put(ref),
        description=f"B={b} T={t} {dtype} mask={mask_kind} adv={adv_kind} spread={spread} old_none={old_is_none}",
    )


def is_informative(problem: LossProblem) -> bool:
    """At least two non-empty rows with a non-zero advantage on a valid token.

    What the batch properties (micro-batch split, random partition, permutation) are about: with
    one row, one non-empty row or zero advantages the loss is a single row's (or 0) and a wrong
    normaliser or a mixed-up row survives them.
    """
    adv = problem.adv if problem.adv.dim() == 2 else problem.adv[:, None].expand_as(problem.mask)
    rows_with_signal = ((adv != 0) & problem.mask).any(-1)
    return problem.logp.shape[0] >= 2 and int(rows_with_signal.sum()) >= 2


@st.composite
def loss_problems(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES, max_b: int = 6,
                  max_t: int | None = None, informative: bool = False) -> LossProblem:
    """A ``LossProblem``; ``informative=True`` draws only problems with ``is_informative`` (B >= 2,
    no all-masked batch, no all-zero advantages; the degenerate cases need their own tests)."""
    b = draw(st.integers(2, max(2, max_b)) if informative else batch_sizes(max_b))
    t = draw(seq_lengths() if max_t is None else st.integers(1, max_t))
    degenerate_masks, degenerate_advs = ("all_masked",), ("zero",)
    problem = make_problem(
        b, t,
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31 - 1)),
        mask_kind=draw(st.sampled_from([k for k in MASK_KINDS if not (informative and k in degenerate_masks)])),
        adv_kind=draw(st.sampled_from([k for k in ADV_KINDS if not (informative and k in degenerate_advs)])),
        spread=draw(st.sampled_from(LOG_RATIO_SPREADS)),
        old_is_none=draw(st.sampled_from([False, False, False, True])),
    )
    if informative:
        assume(is_informative(problem))
    return problem


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant")


@st.composite
def loss_options(draw: st.DrawFn, t: int | None = None) -> dict:
    """Keyword options of ``policy_loss`` (surrogate, KL and aggregation), without counts."""
    eps_low = draw(st.sampled_from([0.2, 0.1, 3e-4]))
    opts = {
        "eps_low": eps_low,
        "eps_high": draw(st.sampled_from([None, 0.28, 4e-4])),
        "dual_clip": draw(st.sampled_from([None, None, 3.0])),
        "level": draw(st.sampled_from(["token", "token", "sequence"])),
        "aggregation": draw(st.sampled_from(AGGREGATIONS)),
        "beta": draw(st.sampled_from([0.0, 0.04])),
        "use_ref": draw(st.booleans()),
    }
    if opts["aggregation"] == "constant":
        opts["max_tokens"] = draw(st.sampled_from([1, 7, 4096]))
    return opts


def call_options(problem: LossProblem, opts: dict) -> dict:
    """``opts`` as keyword arguments of ``policy_loss`` for ``problem`` (KL needs ``ref_logp``)."""
    kw = {k: v for k, v in opts.items() if k != "use_ref"}
    if opts.get("use_ref") or kw.get("beta", 0):
        kw["ref_logp"] = problem.ref_logp
    return kw


def loss_magnitude(problem: LossProblem, kw: dict) -> float:
    """``policy_loss`` taken over |per-token loss|: what a reordered sum's rounding is relative to."""
    from rlloss.aggregation import _aggregate

    opts = {k: kw[k] for k in ("eps_low", "eps_high", "dual_clip", "level") if k in kw}
    with torch.no_grad():
        per_token = rlloss.clipped_surrogate(problem.logp, problem.old_logp, problem.adv, problem.mask,
                                             backend="torch", **opts).abs()
        if kw.get("beta", 0):
            per_token = per_token + kw["beta"] * torch.where(
                problem.mask, rlloss.k3_kl(problem.logp, kw["ref_logp"], backend="torch"), 0.0)
        counts = {k: kw.get(k) for k in ("max_tokens", "num_tokens", "num_seqs")}
        return float(_aggregate(per_token, problem.mask, kw.get("aggregation", "token_mean"),
                                dp_size=kw.get("dp_size", 1), **counts))
