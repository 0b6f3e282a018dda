"""Published recipes as presets: one object holds a paper's advantage and loss settings.

Example::

    # or groups=<a tensor of group ids>
    adv = rlloss.recipes.DAPO.advantages(rewards, group_size=8)
    loss, metrics = rlloss.recipes.DAPO.loss(logp, old_logp, adv, mask)

Keyword arguments given to ``loss``/``advantages`` override the preset (e.g. ``max_tokens`` for
Dr. GRPO, ``num_tokens``/``num_seqs``/``dp_size`` under gradient accumulation, ``backend``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .advantages import group_advantages
from .loss import PolicyLoss, policy_loss
from .objectives import CISPO, DPPO, GMPO, SAPO, Objective
from .shaping import soft_overlong_penalty


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A published recipe's hyperparameters (SPEC "Recipes" table)."""

    name: str
    paper: str
    baseline: str = "mean"
    scale: str = "group"
    eps_low: float = 0.2
    eps_high: float | None = None
    aggregation: str = "seq_mean_token_mean"
    beta: float = 0.0
    level: str = "token"
    dynamic_sampling: bool = False
    overlong_filter: bool = False
    overlong_max_len: int | None = None
    overlong_cache_len: int | None = None
    objective: Objective | None = None  # None: PPO from eps_low/eps_high/level

    def advantage_kwargs(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "scale": self.scale}

    def loss_kwargs(self) -> dict[str, Any]:
        if self.objective is not None:
            return {"objective": self.objective, "aggregation": self.aggregation, "beta": self.beta}
        return {"eps_low": self.eps_low, "eps_high": self.eps_high, "aggregation": self.aggregation,
                "beta": self.beta, "level": self.level}

    def advantages(self, rewards: torch.Tensor, groups: torch.Tensor | None = None, *, group_size: int | None = None,
                   **overrides: Any) -> torch.Tensor:
        """``group_advantages`` with this recipe's baseline and scale.

        ``groups`` (an integer id tensor ``[N]``) or ``group_size`` (an int, contiguous groups),
        exactly one, as in ``group_advantages``.
        """
        return group_advantages(rewards, groups, group_size=group_size, **{**self.advantage_kwargs(), **overrides})

    def loss(self, logp: torch.Tensor, old_logp: torch.Tensor | None, adv: torch.Tensor, mask: torch.Tensor,
             **overrides: Any) -> PolicyLoss:
        """``policy_loss`` with this recipe's clip range, aggregation, KL coefficient and level."""
        return policy_loss(logp, old_logp, adv, mask, **{**self.loss_kwargs(), **overrides})

    def overlong_penalty(self, lengths: torch.Tensor, **overrides: Any) -> torch.Tensor:
        """DAPO's soft overlong penalty with the recipe's lengths (only recipes that define them)."""
        if self.overlong_max_len is None or self.overlong_cache_len is None:
            raise ValueError(f"recipe {self.name} has no overlong penalty; call rlloss.soft_overlong_penalty directly")
        kwargs = {"max_len": self.overlong_max_len, "cache_len": self.overlong_cache_len, **overrides}
        return soft_overlong_penalty(lengths, **kwargs)


GRPO = Recipe(
    name="GRPO", paper="Shao et al. 2024, DeepSeekMath, arXiv 2402.03300",
    eps_low=0.2, eps_high=0.2, aggregation="seq_mean_token_mean", beta=0.04,
)
"""GRPO as published: group-std advantages, clip 0.2, ``seq_mean_token_mean``, k3 KL with ``beta=0.04``."""
DAPO = Recipe(
    name="DAPO", paper="Yu et al. 2025, DAPO, arXiv 2503.14476",
    eps_low=0.2, eps_high=0.28, aggregation="token_mean", beta=0.0,
    dynamic_sampling=True, overlong_filter=True, overlong_max_len=20480, overlong_cache_len=4096,
)
"""DAPO: clip-higher 0.2 / 0.28, ``token_mean``, no KL; dynamic sampling and overlong shaping recorded."""
DR_GRPO = Recipe(
    name="Dr. GRPO", paper="Liu et al. 2025, Dr. GRPO (Understanding R1-Zero), arXiv 2503.20783",
    scale="none", eps_low=0.2, eps_high=0.2, aggregation="constant", beta=0.0,
)
"""Dr. GRPO: no std in the advantage, ``constant`` aggregation (pass ``max_tokens``, the budget)."""
GSPO = Recipe(
    name="GSPO", paper="Zheng et al. 2025, GSPO, arXiv 2507.18071",
    eps_low=3e-4, eps_high=4e-4, aggregation="seq_mean_token_mean", beta=0.0, level="sequence",
)
"""GSPO: one length-normalised ratio per sequence, clip 3e-4 / 4e-4, ``seq_mean_token_mean``."""

LUSPO = Recipe(
    name="LUSPO", paper="GSPO with a length-unnormalised sum (TRL loss_type='luspo')",
    eps_low=3e-4, eps_high=4e-4, aggregation="seq_mean_token_sum", beta=0.0, level="sequence",
)
"""LUSPO: GSPO's sequence ratio with the length-unnormalised ``seq_mean_token_sum``."""
CISPO_RECIPE = Recipe(
    name="CISPO", paper="MiniMax-M1, arXiv 2506.13585 (cap 5.0: ScaleRL, arXiv 2510.13786)",
    aggregation="token_mean", beta=0.0, objective=CISPO(low=None, high=5.0),
)
"""CISPO (MiniMax-M1): ``-sg(min(r, 5)) * A * logp`` (the IS weight capped at 5, detached), ``token_mean``."""
SAPO_RECIPE = Recipe(
    name="SAPO", paper="Soft Adaptive Policy Optimization, arXiv 2511.20347",
    aggregation="seq_mean_token_mean", beta=0.0, objective=SAPO(tau_pos=1.0, tau_neg=1.05),
)
"""SAPO: a smooth sigmoid gate instead of the clip, ``tau_pos=1.0``, ``tau_neg=1.05``."""
GMPO_RECIPE = Recipe(
    name="GMPO", paper="Geometric-Mean Policy Optimization, arXiv 2507.20673",
    aggregation="seq_mean_token_mean", beta=0.0, objective=GMPO(log_clip_low=0.4, log_clip_high=0.4),
)
"""GMPO: the geometric mean of the token ratios per row, log-clip 0.4, ``seq_mean_token_mean``."""
DPPO_RECIPE = Recipe(
    name="DPPO", paper="DPPO, arXiv 2602.04879",
    aggregation="token_mean", beta=0.0, objective=DPPO(divergence="tv", low=0.2, high=0.2, weight_cap=3.0),
)
"""DPPO: a total-variation trust region on the sampled token's probability, ``token_mean``."""

RECIPES = {"grpo": GRPO, "dapo": DAPO, "dr_grpo": DR_GRPO, "gspo": GSPO, "luspo": LUSPO, "cispo": CISPO_RECIPE,
           "sapo": SAPO_RECIPE, "gmpo": GMPO_RECIPE, "dppo": DPPO_RECIPE}
"""Every preset by its lower-case name (``"dr_grpo"``, ``"cispo"``, ...)."""
