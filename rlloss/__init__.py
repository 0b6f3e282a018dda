"""rlloss: exact, fast loss functions for reinforcement learning on language models.

Every public function validates its inputs once and dispatches on ``backend``:
``"torch"`` (the PyTorch reference, the readable spec), ``"triton"`` (fused kernels), or
``"auto"`` (Triton on CUDA tensors when triton imports, otherwise the reference).
"""

from importlib import metadata as _metadata

from . import distributed, recipes
from ._validate import EmptyBatchWarning, SuspiciousInputWarning
from .advantages import (
    gdpo_advantages,
    gpg_advantages,
    group_advantages,
    opo_advantages,
    passk_advantages,
    reinforce_pp_baseline_advantages,
)
from .aggregation import masked_mean
from .corrections import importance_weights, off_policy_mask, rejection_mask, top_entropy_mask
from .hidden import linear_token_logprobs, policy_loss_from_hidden
from .kl import k3_kl, kl_estimate
from .logits import policy_loss_from_logits, token_logprobs
from .loss import PolicyLoss, policy_loss
from .objectives import CISPO, DPPO, DRO, GMPO, PPO, SAPO, VESPO, ClipCov, KLCov, Objective, Reinforce
from .recipes import DAPO, DR_GRPO, GRPO, GSPO, Recipe
from .returns import (
    discounted_returns,
    optimal_token_baseline_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    whiten,
)
from .shaping import dynamic_sampling_mask, soft_overlong_penalty
from .surrogates import (
    cispo_surrogate,
    clip_cov_surrogate,
    clipped_surrogate,
    dppo_surrogate,
    dro_surrogate,
    gmpo_surrogate,
    kl_cov_surrogate,
    reinforce_surrogate,
    sapo_surrogate,
    vespo_surrogate,
)

try:  # the version is written once, in pyproject.toml; the installed metadata carries it
    __version__ = _metadata.version("rlloss")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CISPO",
    "ClipCov",
    "DAPO",
    "DPPO",
    "DRO",
    "DR_GRPO",
    "EmptyBatchWarning",
    "GMPO",
    "GRPO",
    "GSPO",
    "KLCov",
    "Objective",
    "PPO",
    "PolicyLoss",
    "Recipe",
    "Reinforce",
    "SAPO",
    "SuspiciousInputWarning",
    "VESPO",
    "cispo_surrogate",
    "clip_cov_surrogate",
    "clipped_surrogate",
    "discounted_returns",
    "distributed",
    "dppo_surrogate",
    "dro_surrogate",
    "dynamic_sampling_mask",
    "gdpo_advantages",
    "gmpo_surrogate",
    "gpg_advantages",
    "group_advantages",
    "importance_weights",
    "k3_kl",
    "kl_cov_surrogate",
    "kl_estimate",
    "linear_token_logprobs",
    "masked_mean",
    "off_policy_mask",
    "opo_advantages",
    "optimal_token_baseline_advantages",
    "passk_advantages",
    "policy_loss",
    "policy_loss_from_hidden",
    "policy_loss_from_logits",
    "recipes",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "reinforce_surrogate",
    "rejection_mask",
    "remax_advantages",
    "sapo_surrogate",
    "soft_overlong_penalty",
    "token_logprobs",
    "top_entropy_mask",
    "vespo_surrogate",
    "whiten",
]
