"""Policy objectives beyond the PPO clip, one frozen dataclass each, fields named for what they mean.

Each object checks its fields when built (``ValueError`` naming the field) and computes its
per-token loss in ``token_loss`` from inputs already prepared by ``policy_loss`` (upcast, 0 at
masked positions, ``adv`` broadcast to ``[B, T]``). Names mean one thing each: unlike the peers'
shared ``epsilon``/``clip_ratio`` fields, no field changes meaning between objectives.

Notation (SPEC, "Beyond PPO"): ``d = logp - old_logp``, ``dc = clamp(d, +-max_log_ratio)``,
``r = exp(dc)``, ``A`` the advantage broadcast over tokens, ``sg`` stop-gradient. rlloss clamps
``d`` where TRL, Liger and verl's kl_cov/clip_cov/geo_mean do not: deliberate, it keeps ``exp``
finite; it binds only at log-ratios of 20 (a ratio of 5e8).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ._constants import LOG_FLOOR, LOG_OF_FLOOR, ROW_LOG_WEIGHT_MAX, VESPO_MIN_LAM
from ._validate import check_choice, check_number


def _clamped(d: torch.Tensor, max_log_ratio: float) -> torch.Tensor:
    return torch.clamp(d, -max_log_ratio, max_log_ratio)


def _row_count(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return mask.sum(-1).to(dtype)


@dataclasses.dataclass(frozen=True)
class Objective:
    """Base of the objectives: ``token_loss`` returns the per-token loss and the ratio used for metrics."""

    name: ClassVar[str] = ""
    per_row: ClassVar[bool] = False  # GMPO: one loss per sequence

    def token_loss(self, logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                   max_log_ratio: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss ``[B, T]``, ratio ``[B, T]``, metric indicators ``[B, T]``) on prepared inputs."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class PPO(Objective):
    """PPO's clipped surrogate (Schulman et al. 2017), GRPO/DAPO's; GSPO with ``level="sequence"``.

    ``l = -min(min(r, delta) * A, clip(r, 1-eps_low, 1+eps_high) * A)``; dual clip ``c``: where
    ``A < 0``, ``l = min(l, -c*A)``. ``delta`` caps the unclipped branch (INTELLECT-2, arXiv
    2505.07291; TRL ``delta``, which recommends ``delta > 1 + eps_high``, not enforced).
    ``eps_high=None`` means ``eps_low``.
    """

    name: ClassVar[str] = "ppo"
    eps_low: float = 0.2
    eps_high: float | None = None
    dual_clip: float | None = None
    delta: float | None = None
    level: str = "token"

    def __post_init__(self) -> None:
        check_number("eps_low", self.eps_low, low=0, high=1, high_inclusive=False)
        check_number("eps_high", self.eps_high, low=0, allow_none=True)
        if self.dual_clip is not None:
            check_number("dual_clip", self.dual_clip, low=1, low_inclusive=False)
        check_number("delta", self.delta, low=0, low_inclusive=False, allow_none=True)
        check_choice("level", self.level, ("token", "sequence"))

    @property
    def high(self) -> float:
        return self.eps_low if self.eps_high is None else self.eps_high

    def log_ratio(self, logp, old_logp, mask, max_log_ratio):
        d = logp - old_logp
        if self.level == "sequence":  # GSPO: the row's mean log-ratio, with each token's own gradient
            s = (d.detach().sum(-1) / _row_count(mask, d.dtype).clamp(min=1))[:, None]
            d = logp - logp.detach() + s
        return _clamped(d, max_log_ratio)

    def token_loss(self, logp, old_logp, adv, mask, max_log_ratio):
        ratio = torch.exp(self.log_ratio(logp, old_logp, mask, max_log_ratio))
        unclipped = ratio if self.delta is None else torch.clamp(ratio, max=self.delta)
        surrogate = torch.minimum(unclipped * adv, torch.clamp(ratio, 1 - self.eps_low, 1 + self.high) * adv)
        loss = -surrogate
        flags = {"clip_low": (ratio < 1 - self.eps_low) & (adv < 0), "clip_high": (ratio > 1 + self.high) & (adv > 0)}
        if self.dual_clip is not None:
            flags["clip_dual"] = (adv < 0) & (loss > -self.dual_clip * adv)
            loss = torch.where(adv < 0, torch.minimum(loss, -self.dual_clip * adv), loss)
        else:
            flags["clip_dual"] = torch.zeros_like(mask)
        return loss, ratio, flags


@dataclasses.dataclass(frozen=True)
class CISPO(Objective):
    """CISPO (MiniMax-M1, arXiv 2506.13585): ``l = -sg(clamp(r, low, high)) * A * logp``.

    The clipped importance weight scales a REINFORCE term, so every token keeps its gradient (PPO
    zeroes clipped ones). ``low``/``high`` are absolute bounds on the weight (``None``: unbounded).
    verl ``clip_ratio_low/high = a, b`` is ``low=1-a, high=1+b``; TRL ``epsilon_high = c`` is
    ``low=None, high=c``. Default cap 5.0 (ScaleRL, arXiv 2510.13786).
    """

    name: ClassVar[str] = "cispo"
    low: float | None = None
    high: float | None = 5.0

    def __post_init__(self) -> None:
        check_number("low", self.low, low=0, allow_none=True)
        check_number("high", self.high, low=0, low_inclusive=False, allow_none=True)
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low} > high={self.high}")

    def token_loss(self, logp, old_logp, adv, mask, max_log_ratio):
        ratio = torch.exp(_clamped(logp - old_logp, max_log_ratio))
        weight = torch.clamp(ratio, min=self.low, max=self.high).detach()
        flags = {
            "clip_low": ratio < self.low if self.low is not None else torch.zeros_like(mask),
            "clip_high": ratio > self.high if self.high is not None else torch.zeros_like(mask),
        }
        return -weight * adv * logp, ratio, flags


@dataclasses.dataclass(frozen=True)
class SAPO(Objective):
    """SAPO (arXiv 2511.20347): a smooth gate instead of a hard clip.

    ``l = -A * (4/tau) * sigmoid(tau * (r - 1))`` with ``tau = tau_pos`` where ``A > 0`` else
    ``tau_neg``; at ``r = 1`` the gradient equals PPO's. verl forces ``seq_mean_token_mean`` over
    non-empty rows: pass that aggregation and ``num_seqs`` to reproduce it.
    """

    name: ClassVar[str] = "sapo"
    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self) -> None:
        check_number("tau_pos", self.tau_pos, low=0, low_inclusive=False)
        check_number("tau_neg", self.tau_neg, low=0, low_inclusive=False)

    def token_loss(self, logp, old_logp, adv, mask, max_log_ratio):
        ratio = torch.exp(_clamped(logp - old_logp, max_log_ratio))
        tau = torch.where(adv > 0, torch.full_like(adv, self.tau_pos), torch.full_like(adv, self.tau_neg))
        return -adv * (4 / tau) * torch.sigmoid(tau * (ratio - 1)), ratio, {}


@dataclasses.dataclass(frozen=True)
class Reinforce(Objective):
    """REINFORCE: ``l = -A * logp`` (GPG, arXiv 2504.02546; verl's bypass mode). ``old_logp`` is unused."""

    name: ClassVar[str] = "reinforce"

    def token_loss(self, logp, old_logp, adv, mask, max_log_ratio):
        ratio = torch.exp(_clamped(logp - old_logp, max_log_ratio))
        return -adv * logp, ratio, {}


@dataclasses.dataclass(frozen=True)
class DPPO(Objective):
    """DPPO (arXiv 2602.04879): a trust region on the sampled token's probability, not the ratio.

    ``w = sg(min(r, weight_cap))``, ``p = exp(logp)``, ``q = exp(old_logp)``.
    ``divergence="tv"``: ``ok+ = p - q <= high``, ``ok- = p - q >= -low``. ``"kl"`` (binary KL of
    the token's Bernoulli): ``b = q*(log q - log p) + (1-q)*log((1-q+1e-8)/(1-p+1e-8))``,
    ``ok+ = b <= high or p <= q``, ``ok- = b <= low or p >= q``.
    ``l = -A * w * sg(ok+ if A > 0 else ok-) * logp``: tokens outside the region get no gradient.
    verl ``clip_ratio_low/high/c`` are ``low``/``high``/``weight_cap``.
    """

    name: ClassVar[str] = "dppo"
    divergence: str = "tv"
    low: float = 0.2
    high: float = 0.2
    weight_cap: float = 3.0

    def __post_init__(self) -> None:
        check_choice("divergence", self.divergence, ("tv", "kl"))
        check_number("low", self.low, low=0)
        check_number("high", self.high, low=0)
        check_number("weight_cap", self.weight_cap, low=0, low_inclusive=False)

    def inside(self, logp, old_logp, adv):
        p, q = torch.exp(logp), torch.exp(old_logp)
        if self.divergence == "tv":
            ok_pos, ok_neg = p - q <= self.high, p - q >= -self.low
        else:
            b = q * (old_logp - logp) + (1 - q) * torch.log((1 - q + LOG_FLOOR) / (1 - p + LOG_FLOOR))
            ok_pos, ok_neg = (b <= self.high) | (p <= q), (b <= self.low) | (p >= q)
        return torch.where(adv > 0, ok_pos, ok_neg)

    def token_loss(self, logp, old_logp, adv, mask, max_log_ratio):
        ratio = torch.exp(_clamped(logp - old_logp, max_log_ratio))
        weight = torch.clamp(ratio, max=self.weight_cap).detach()
        ok = self.inside(logp.detach(), old_logp, adv)
        return -adv * weight * ok.to(logp.dtype) * logp, ratio, {"outside_region": ~ok}


@dataclasses.dataclass(frozen=True)
class DRO(Objective):
    """DRO (verl ``dro``): ``l = -(A * logp - beta/2 * d^2)``, ``d`` unclamped; ``beta > 0``.

    ``beta`` here is DRO's quadratic regulariser on the log-ratio, not ``policy_loss``'s KL
    coefficient (the SPEC keeps verl's name for it).
    """

    name: ClassVar[str] = "dro"
    beta: float = dataclasses.field(default=None)  # type: ignore[assignment]  (required)

    def __post_init__(self) -> None:
        if self.beta is None:
            raise ValueError("DRO needs beta, its quadratic regulariser: build DRO(beta=...), got beta=None")
        check_number("beta", self.beta, low=0, low_inclusive=False)

    def token_loss(self, logp, old_logp, adv, mask, max_log_ratio):
        d = logp - old_logp
        return -(adv * logp - self.beta / 2 * d**2), torch.exp(_clamped(d, max_log_ratio)), {}


@dataclasses.dataclass(frozen=True)
class VESPO(Objective):
    """VESPO (arXiv 2602.10693; TRL): a per-sequence weight ``phi`` of the sequence ratio.

    Per row ``s = sum_t m * dc`` (a sum), ``lw = clamp(s, log 1e-8, 20)``, ``w = exp(lw)``;
    ``(k, lam) = (k_pos, lam_pos)`` where ``A >= 0`` else ``(k_neg, lam_neg)``, ``lam = max(lam,
    1e-4)``, ``phi = exp(lam + k*lw - lam*w)`` (1 at ``w = 1``), and ``l = -sg(phi) * A * logp``.
    TRL folds its vLLM IS ratio into ``s``: pass ``old_logp - clamp(log isr, log 1e-8, 20)`` as
    ``old_logp`` to reproduce it.
    """

    name: ClassVar[str] = "vespo"
    k_pos: float = 2.0
    lam_pos: float = 3.0
    k_neg: float = 3.0
    lam_neg: float = 2.0

    def __post_init__(self) -> None:
        for field in ("k_pos", "lam_pos", "k_neg", "lam_neg"):
            check_number(field, getattr(self, field))

    def token_loss(self, logp, old_logp, adv, mask, max_log_ratio):
        dc = _clamped(logp - old_logp, max_log_ratio).detach()
        lw = torch.clamp(torch.where(mask, dc, torch.zeros_like(dc)).sum(-1, keepdim=True), LOG_OF_FLOOR, ROW_LOG_WEIGHT_MAX)
        w = torch.exp(lw)
        positive = adv >= 0
        k = torch.where(positive, torch.full_like(adv, self.k_pos), torch.full_like(adv, self.k_neg))
        lam = torch.where(positive, torch.full_like(adv, max(self.lam_pos, VESPO_MIN_LAM)),
                          torch.full_like(adv, max(self.lam_neg, VESPO_MIN_LAM)))
        phi = torch.exp(lam + k * lw - lam * w)
        return -phi * adv * logp, w.expand_as(logp), {}


@dataclasses.dataclass(frozen=True)
class GMPO(Objective):
    """GMPO (arXiv 2507.20673; verl ``geo_mean``): the geometric mean of the token ratios per row.

    ``s = sign(A)``, ``dl = clamp(dc, -log_clip_low, log_clip_high)``, ``dm = s * min(s*dc, s*dl)``,
    ``rho_i = exp(sum_t m*dm / n_i)``, ``Abar_i = sum_t m*A / n_i``, ``l_i = -Abar_i * rho_i`` (0 for an
    empty row). Only ``aggregation="seq_mean_token_mean"``: the loss is
    ``sum_i (w_i * l_i + sum_t m*beta*kl / n_i) / N_seq``. The row ratio is invariant to the order
    of the tokens, which is the point of a geometric mean.
    """

    name: ClassVar[str] = "gmpo"
    per_row: ClassVar[bool] = True
    log_clip_low: float = 0.4
    log_clip_high: float = 0.4

    def __post_init__(self) -> None:
        check_number("log_clip_low", self.log_clip_low, low=0)
        check_number("log_clip_high", self.log_clip_high, low=0)

    def row_loss(self, logp, old_logp, adv, mask, max_log_ratio):
        """(``l_i`` ``[B]``, ``rho_i`` ``[B]``)."""
        dc = _clamped(logp - old_logp, max_log_ratio)
        s = torch.sign(adv)
        dl = torch.clamp(dc, -self.log_clip_low, self.log_clip_high)
        dm = s * torch.minimum(s * dc, s * dl)
        n = _row_count(mask, dc.dtype)
        zero = torch.zeros_like(dm)
        rho = torch.exp(torch.where(n > 0, torch.where(mask, dm, zero).sum(-1) / n.clamp(min=1), n * 0))
        abar = torch.where(mask, adv, zero).sum(-1) / n.clamp(min=1)
        return torch.where(n > 0, -abar * rho, n * 0), rho


@dataclasses.dataclass(frozen=True)
class KLCov(Objective):
    """KL-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs"; verl ``kl_cov``).

    ``l = -A*r``; over the valid tokens of the call, ``cov = (A - mean A) * (logp - mean logp)``
    (detached); the ``k = max(1, int(N*ratio))`` tokens of largest ``cov`` add ``coef * |d|``. The
    selection spans the whole call, so the loss of a micro-batch is not a slice of the batch's:
    this objective does not split exactly over micro-batches. Reference only: ``backend="auto"``
    uses the reference, ``"triton"`` raises.
    """

    name: ClassVar[str] = "kl_cov"
    ratio: float = 2e-4
    coef: float = 0.1

    def __post_init__(self) -> None:
        check_number("ratio", self.ratio, low=0, low_inclusive=False, high=1)
        check_number("coef", self.coef, low=0)

    def token_loss(self, logp, old_logp, adv, mask, max_log_ratio):
        d = logp - old_logp
        ratio = torch.exp(_clamped(d, max_log_ratio))
        loss = -adv * ratio
        selected = _top_cov(logp.detach(), adv, mask, self.ratio)
        loss = loss + torch.where(selected, self.coef * d.abs(), torch.zeros_like(loss))
        return loss, ratio, {"cov_selected": selected}


@dataclasses.dataclass(frozen=True)
class ClipCov(Objective):
    """Clip-Cov (same paper; verl ``clip_cov``): zero the loss of a random few high-covariance tokens.

    ``l1 = -A*r``, ``l2 = -A*clip(r, 1-eps_low, 1+eps_high)``; candidates are valid tokens with
    ``l2 <= l1`` and ``cov_low < cov < cov_high`` (``cov`` as KL-Cov's, with ``sg(logp)``);
    ``min(max(int(ratio*N), 1), #candidates)`` of them, drawn uniformly by a CPU
    ``torch.Generator`` seeded with ``seed`` (the same draw on every device), get ``l = 0``; the
    rest ``max(l1, l2)``. Reference only, like ``KLCov``.
    """

    name: ClassVar[str] = "clip_cov"
    ratio: float = 2e-4
    cov_low: float = 1.0
    cov_high: float = 5.0
    eps_low: float = 0.2
    eps_high: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("ratio", self.ratio, low=0, low_inclusive=False, high=1)
        check_number("cov_low", self.cov_low)
        check_number("cov_high", self.cov_high)
        if self.cov_low > self.cov_high:
            raise ValueError(f"cov_low must be <= cov_high, got {self.cov_low} > {self.cov_high}")
        check_number("eps_low", self.eps_low, low=0, high=1, high_inclusive=False)
        check_number("eps_high", self.eps_high, low=0, allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    def token_loss(self, logp, old_logp, adv, mask, max_log_ratio):
        ratio = torch.exp(_clamped(logp - old_logp, max_log_ratio))
        high = self.eps_low if self.eps_high is None else self.eps_high
        l1 = -adv * ratio
        l2 = -adv * torch.clamp(ratio, 1 - self.eps_low, 1 + high)
        cov = _covariance(logp.detach(), adv, mask)
        candidates = mask & (l2 <= l1).detach() & (cov > self.cov_low) & (cov < self.cov_high)
        n_valid = int(mask.sum())
        k = min(max(int(self.ratio * n_valid), 1), int(candidates.sum()))
        chosen = torch.zeros(candidates.numel(), dtype=torch.bool)
        idx = candidates.flatten().nonzero().flatten().cpu()
        if k > 0:
            draw = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(self.seed))[:k]
            chosen[idx[draw]] = True
        chosen = chosen.view_as(candidates).to(mask.device)
        loss = torch.where(chosen, torch.zeros_like(l1), torch.maximum(l1, l2))
        return loss, ratio, {"cov_selected": chosen}


def _covariance(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(A - mean A) * (logp - mean logp)`` with means over the valid tokens of the call."""
    n = mask.sum().clamp(min=1).to(logp.dtype)
    zero = torch.zeros_like(logp)
    mean_a = torch.where(mask, adv, zero).sum() / n
    mean_lp = torch.where(mask, logp, zero).sum() / n
    return (adv - mean_a) * (logp - mean_lp)


def _top_cov(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """The ``max(1, int(N*ratio))`` valid tokens of largest covariance (none when N = 0)."""
    n_valid = int(mask.sum())
    selected = torch.zeros_like(mask)
    if n_valid == 0:
        return selected
    k = max(1, int(n_valid * ratio))
    cov = torch.where(mask, _covariance(logp, adv, mask), torch.full_like(logp, float("-inf")))
    top = torch.topk(cov.flatten(), k).indices
    return selected.flatten().index_fill(0, top, True).view_as(mask)


OBJECTIVES: dict[str, type[Objective]] = {
    "ppo": PPO, "cispo": CISPO, "sapo": SAPO, "reinforce": Reinforce, "vespo": VESPO, "gmpo": GMPO,
    "kl_cov": KLCov, "clip_cov": ClipCov,
}
NAMED = {**{name: cls() for name, cls in OBJECTIVES.items()},
         "dppo_tv": DPPO(divergence="tv"), "dppo_kl": DPPO(divergence="kl")}


def _resolve_objective(objective: object) -> Objective:
    """An objective object, or the name of one built with its defaults."""
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, str):
        if objective == "dro":
            raise ValueError('objective "dro" has no defaults: build rlloss.DRO(beta=...)')
        if objective not in NAMED:
            raise ValueError(f"objective must be one of {sorted(NAMED)} or an objective object, got {objective!r}")
        return NAMED[objective]
    raise TypeError(f"objective must be an objective object (rlloss.PPO, rlloss.CISPO, ...) or a name, "
                    f"got {type(objective).__name__}")
