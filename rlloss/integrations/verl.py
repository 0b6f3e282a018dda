"""rlloss's policy losses and advantage estimators, registered with verl's own registries (verl 0.9.1).

Importing this module registers, through ``verl.trainer.ppo.core_algos.register_policy_loss`` and
``register_adv_est``:

* policy losses (``actor.policy_loss.loss_mode``): ``rlloss_ppo`` (verl's ``vanilla``: clip
  ``clip_ratio_low/high``, dual clip ``clip_ratio_c``), ``rlloss_gspo`` (verl's ``gspo``) and
  ``rlloss_<name>`` for every rlloss objective (``POLICY_LOSSES``), each built from verl's own
  config fields;
* advantage estimators (``algorithm.adv_estimator``): ``rlloss_grpo``, ``rlloss_dr_grpo``,
  ``rlloss_rloo``, ``rlloss_opo``, ``rlloss_gpg``, ``rlloss_reinforce_plus_plus``,
  ``rlloss_reinforce_plus_plus_baseline``, ``rlloss_remax`` (``ESTIMATORS``).

verl imports it in every process by itself: rlloss declares it as the ``verl.plugins`` entry point
``rlloss`` (installing rlloss declares it; then ``import verl`` loads it); without the installed
entry point set ``VERL_USE_EXTERNAL_MODULES=rlloss.integrations.verl``. Switching a run is one line::

    actor_rollout_ref.actor.policy_loss.loss_mode=rlloss_ppo  # rlloss_cispo, ...
    algorithm.adv_estimator=rlloss_grpo

Registration is idempotent: importing the module again (a reload, a second worker import) keeps
the functions already registered by rlloss, where verl's ``register_adv_est`` would raise.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

import rlloss
from rlloss._constants import MAX_LOG_RATIO  # policy_loss's clamp of logp - old_logp, verl's too

from . import missing_trainer

try:
    from verl.trainer.ppo import core_algos
except ImportError as exc:  # pragma: no cover - exercised in an environment without verl
    raise missing_trainer("verl", exc) from exc

PREFIX = "rlloss_"
"""The prefix of every name rlloss registers with verl (``rlloss_ppo``, ``rlloss_grpo``, ...)."""
VERL_EPS = 1e-6
"""verl's epsilon for the group std."""


def _get(config: Any, name: str, default: Any = None) -> Any:
    """A field of an ``ActorConfig``/``AlgoConfig`` dataclass or a legacy ``DictConfig``."""
    if config is None:
        return default
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def _clip_range(config: Any) -> tuple[float, float]:
    """verl's ``clip_ratio_low``/``clip_ratio_high``, each falling back to ``clip_ratio``."""
    clip = _get(config, "clip_ratio", 0.2)
    return _get(config, "clip_ratio_low", clip), _get(config, "clip_ratio_high", clip)


# --- policy losses ------------------------------------------------------------------------------

def _ppo(config: Any) -> rlloss.Objective:
    low, high = _clip_range(config)
    return rlloss.PPO(eps_low=low, eps_high=high, dual_clip=_get(config, "clip_ratio_c", 3.0))


def _gspo(config: Any) -> rlloss.Objective:
    low, high = _clip_range(config)
    return rlloss.PPO(eps_low=low, eps_high=high, level="sequence")


def _cispo(config: Any) -> rlloss.Objective:
    low, high = _clip_range(config)
    return rlloss.CISPO(low=1 - low, high=1 + high)  # verl's bounds are relative to 1


def _sapo(config: Any) -> rlloss.Objective:
    return rlloss.SAPO(tau_pos=_get(config, "tau_pos", 1.0), tau_neg=_get(config, "tau_neg", 1.05))


def _dppo(divergence: str) -> Callable[[Any], rlloss.Objective]:
    def build(config: Any) -> rlloss.Objective:
        low, high = _clip_range(config)
        return rlloss.DPPO(divergence=divergence, low=low, high=high, weight_cap=_get(config, "clip_ratio_c", 3.0))
    return build


def _gmpo(config: Any) -> rlloss.Objective:
    low, high = _clip_range(config)
    return rlloss.GMPO(log_clip_low=low, log_clip_high=high)  # verl's geo_mean: log-space bounds


def _kl_cov(config: Any) -> rlloss.Objective:
    loss = _get(config, "policy_loss")
    return rlloss.KLCov(ratio=_get(loss, "kl_cov_ratio", 2e-4), coef=_get(loss, "ppo_kl_coef", 1.0))


def _clip_cov(config: Any) -> rlloss.Objective:
    loss = _get(config, "policy_loss")
    low, high = _clip_range(config)
    return rlloss.ClipCov(ratio=_get(loss, "clip_cov_ratio", 2e-4), cov_low=_get(loss, "clip_cov_lb", 1.0),
                          cov_high=_get(loss, "clip_cov_ub", 5.0), eps_low=low, eps_high=high)


def _dro(config: Any) -> rlloss.Objective:
    beta = _get(_get(config, "policy_loss"), "dro_beta")
    if beta is None:
        raise ValueError("rlloss_dro needs actor.policy_loss.dro_beta > 0 (DRO's quadratic penalty), got None")
    return rlloss.DRO(beta=beta)


POLICY_LOSSES: dict[str, tuple[Callable[[Any], rlloss.Objective], str | None, str | None]] = {
    "ppo": (_ppo, "vanilla", None),
    "gspo": (_gspo, "gspo", None),
    "cispo": (_cispo, "cispo", None),
    "sapo": (_sapo, "sapo", "seq-mean-token-mean"),  # verl's sapo ignores loss_agg_mode
    "reinforce": (lambda config: rlloss.Reinforce(), "gpg", None),
    "dppo_tv": (_dppo("tv"), "dppo_tv", None),
    "dppo_kl": (_dppo("kl"), "dppo_kl", None),
    "gmpo": (_gmpo, "geo_mean", "seq-mean-token-mean"),
    "kl_cov": (_kl_cov, "kl_cov", None),
    "clip_cov": (_clip_cov, "clip_cov", None),
    "dro": (_dro, "dro", None),
    "vespo": (lambda config: rlloss.VESPO(), None, None),
}
"""The policy losses: name -> (its objective from verl's actor config, the verl loss it reproduces, the
aggregation it forces or None)."""


def verl_normalizer(loss_agg_mode: str, mask: torch.Tensor, global_batch_info: dict | None) -> dict[str, Any]:
    """``policy_loss``'s aggregation arguments for verl's ``loss_agg_mode`` and ``global_batch_info``.

    ``token-mean``: ``token_mean, num_tokens=batch_num_tokens`` (local count when absent);
    ``token-sum``: ``token_sum``; ``seq-mean-token-mean``/``seq-mean-token-sum``: the seq-mean
    aggregations with ``num_seqs=global_batch_size``, else the non-empty rows of the micro-batch;
    ``seq-mean-token-sum-norm``: ``constant``, ``max_tokens=loss_scale_factor`` (else the padded
    length ``T``) and the same ``num_seqs``; all times ``dp_size``. As verl, a ``dp_size > 1``
    without the global count is a ``ValueError``.
    """
    info = {key: value.to(mask.device) if isinstance(value, torch.Tensor) else value
            for key, value in (global_batch_info or {}).items()}  # counts on the loss's device
    dp_size = int(info.get("dp_size") or 1)
    if loss_agg_mode == "token-mean":
        tokens = info.get("batch_num_tokens")
        if tokens is None and dp_size > 1:
            raise ValueError("loss_agg_mode='token-mean' with dp_size > 1 needs global_batch_info['batch_num_tokens']")
        return {"aggregation": "token_mean", "num_tokens": tokens, "dp_size": dp_size}
    if loss_agg_mode == "token-sum":
        return {"aggregation": "token_sum", "dp_size": dp_size}
    seqs = info.get("global_batch_size")
    if seqs is None:
        if dp_size > 1:
            raise ValueError(f"loss_agg_mode={loss_agg_mode!r} with dp_size > 1 needs "
                             "global_batch_info['global_batch_size']")
        seqs = mask.any(-1).sum()  # verl counts the non-empty rows
    if loss_agg_mode == "seq-mean-token-mean":
        return {"aggregation": "seq_mean_token_mean", "num_seqs": seqs, "dp_size": dp_size}
    if loss_agg_mode == "seq-mean-token-sum":
        return {"aggregation": "seq_mean_token_sum", "num_seqs": seqs, "dp_size": dp_size}
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = info.get("loss_scale_factor") or mask.shape[-1]
        return {"aggregation": "constant", "max_tokens": scale, "num_seqs": seqs, "dp_size": dp_size}
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")


def clip_fractions(objective: rlloss.Objective, metrics: dict[str, torch.Tensor], log_prob: torch.Tensor,
                   old_log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """verl's ``pg_clipfrac`` (and ``pg_clipfrac_lower`` where verl's own loss logs one) for an objective that clips.

    Fractions of the valid tokens, as verl's loss of the same objective logs them: PPO (``vanilla``,
    ``gspo``): the clip binds (``clip_low + clip_high``), lower: the dual clip binds (0 without one,
    as verl's ``gspo``); CISPO: the weight is outside ``[low, high]`` (lower 0, as verl); DPPO: the
    token is outside the trust region, lower: its weight is capped at ``weight_cap`` inside it;
    GMPO (``geo_mean``): the log-ratio is outside ``[-log_clip_low, log_clip_high]`` with ``A > 0``,
    lower: with ``A < 0``; Clip-Cov: the tokens whose gradient is cut (``cov_selected``). The other
    objectives clip nothing: none.
    """
    def fraction(flag: torch.Tensor) -> torch.Tensor:
        return (flag & mask).sum(dtype=torch.float32) / mask.sum().clamp(min=1)

    zero = torch.zeros((), device=mask.device)
    if isinstance(objective, rlloss.PPO):
        return {"pg_clipfrac": metrics["clip_low"] + metrics["clip_high"], "pg_clipfrac_lower": metrics["clip_dual"]}
    if isinstance(objective, rlloss.CISPO):
        return {"pg_clipfrac": metrics["clip_low"] + metrics["clip_high"], "pg_clipfrac_lower": zero}
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(mask)
    d = torch.clamp(log_prob - old_log_prob, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    if isinstance(objective, rlloss.DPPO):
        inside = objective.inside(log_prob, old_log_prob, adv)
        return {"pg_clipfrac": metrics["outside_region"],
                "pg_clipfrac_lower": fraction(inside & (torch.exp(d) > objective.weight_cap))}
    if isinstance(objective, rlloss.GMPO):
        clipped = (d < -objective.log_clip_low) | (d > objective.log_clip_high)
        return {"pg_clipfrac": fraction(clipped & (adv > 0)), "pg_clipfrac_lower": fraction(clipped & (adv < 0))}
    if isinstance(objective, rlloss.ClipCov):
        return {"pg_clipfrac": metrics["cov_selected"]}
    return {}


def make_policy_loss(name: str) -> Callable[..., tuple[torch.Tensor, dict[str, float]]]:
    """The verl policy-loss function ``rlloss_<name>``: ``rlloss.policy_loss`` with ``beta=0``.

    verl's ``ppo_loss`` adds the KL (``kl_loss_coef``) and entropy (``entropy_coeff``) terms
    itself, so rlloss computes the surrogate only. ``rollout_is_weights`` become
    ``token_weights``. Metrics: ``actor/ppo_kl`` (masked mean of ``old_logp - logp``), verl's
    ``actor/pg_clipfrac`` (and ``actor/pg_clipfrac_lower``) for every objective that clips
    (``clip_fractions``), and every rlloss metric as ``actor/rlloss/<metric>``.
    """
    build, _, forced_mode = POLICY_LOSSES[name]

    def policy_loss_fn(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                       response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                       rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        mask = response_mask.bool()
        objective = build(config)
        info = _get(config, "global_batch_info", None)
        mode = forced_mode or loss_agg_mode
        if isinstance(objective, rlloss.GMPO):
            # verl's geo_mean: the mean over the micro-batch's rows, empty ones included
            info = info or {}
            normaliser = {"aggregation": "seq_mean_token_mean",
                          "num_seqs": info.get("global_batch_size") or mask.shape[0],
                          "dp_size": int(info.get("dp_size") or 1)}
        else:
            normaliser = verl_normalizer(mode, mask, info)
        weights = None if rollout_is_weights is None else rollout_is_weights.detach()
        result = rlloss.policy_loss(log_prob, old_log_prob, advantages, mask, objective=objective,
                                    token_weights=weights, **normaliser)
        metrics = {f"actor/rlloss/{key}": value.item() for key, value in result.metrics.items()}
        log_ratio = torch.where(mask, (old_log_prob - log_prob).detach(), 0.0)
        metrics["actor/ppo_kl"] = (log_ratio.sum() / mask.sum().clamp(min=1)).item()
        fractions = clip_fractions(objective, result.metrics, log_prob.detach(), old_log_prob, advantages, mask)
        metrics.update({f"actor/{key}": value.item() for key, value in fractions.items()})
        return result.loss, metrics

    policy_loss_fn.__name__ = policy_loss_fn.__qualname__ = f"{PREFIX}{name}"
    policy_loss_fn.__doc__ = f"verl policy loss {PREFIX}{name}: the rlloss objective {name} (see make_policy_loss)."
    return policy_loss_fn


# --- advantage estimators -----------------------------------------------------------------------

def _group_ids(index: Any, device: torch.device) -> torch.Tensor:
    """verl's ``index`` (uid strings per response) as int64 group ids."""
    if index is None:
        raise ValueError("this estimator groups responses by prompt: verl must pass index (the 'uid' field)")
    _, ids = np.unique(np.asarray(index), return_inverse=True)
    return torch.as_tensor(ids.reshape(-1), dtype=torch.int64, device=device)


def _grouped(scale: str, baseline: str = "mean") -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def estimator(token_level_rewards, response_mask, index=None, config=None, **kwargs):
        scores = token_level_rewards.sum(-1)
        groups = _group_ids(index, scores.device)
        chosen = scale
        if scale == "group" and not _get(config, "norm_adv_by_std_in_grpo", True):
            chosen = "none"  # verl's Dr. GRPO switch on the grpo estimator
        adv = rlloss.group_advantages(scores, groups=groups, baseline=baseline, scale=chosen, eps=VERL_EPS,
                                      singleton="keep")
        adv = adv.to(token_level_rewards.dtype)[:, None] * response_mask
        return adv, adv
    return estimator


def _opo(token_level_rewards, response_mask, index=None, config=None, **kwargs):
    scores = token_level_rewards.sum(-1)
    adv = rlloss.opo_advantages(scores, groups=_group_ids(index, scores.device), mask=response_mask, singleton="keep")
    adv = adv.to(token_level_rewards.dtype)
    return adv, adv


def _gpg(token_level_rewards, response_mask, index=None, config=None, **kwargs):
    scores = token_level_rewards.sum(-1)
    adv = rlloss.gpg_advantages(scores, groups=_group_ids(index, scores.device), mask=response_mask, singleton="keep")
    adv = adv.to(token_level_rewards.dtype)
    return adv, adv


def _reinforce_pp(token_level_rewards, response_mask, config=None, **kwargs):
    gamma = _get(config, "gamma", 1.0)
    returns = rlloss.discounted_returns(token_level_rewards, response_mask, gamma=gamma)
    adv = rlloss.reinforce_pp_advantages(token_level_rewards, response_mask, gamma=gamma)
    return adv.to(token_level_rewards.dtype), returns.to(token_level_rewards.dtype)


def _reinforce_pp_baseline(token_level_rewards, response_mask, index=None, config=None, **kwargs):
    scores = token_level_rewards.sum(-1)
    adv = rlloss.reinforce_pp_baseline_advantages(scores, groups=_group_ids(index, scores.device),
                                                  mask=response_mask, singleton="keep")
    adv = adv.to(token_level_rewards.dtype)
    return adv, adv


def _remax(token_level_rewards, response_mask, reward_baselines=None, config=None, **kwargs):
    if reward_baselines is None:
        raise ValueError("rlloss_remax needs reward_baselines (verl's greedy-decoding scores)")
    returns = rlloss.discounted_returns(token_level_rewards, response_mask, gamma=1.0)
    adv = rlloss.remax_advantages(token_level_rewards, response_mask, reward_baselines)
    return adv.to(token_level_rewards.dtype), returns.to(token_level_rewards.dtype)


ESTIMATORS: dict[str, tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], str]] = {
    "grpo": (_grouped("group"), "grpo"),
    "dr_grpo": (_grouped("none"), "grpo"),  # verl: grpo with norm_adv_by_std_in_grpo=False
    "rloo": (_grouped("none", baseline="loo"), "rloo"),
    "opo": (_opo, "opo"),
    "gpg": (_gpg, "gpg"),
    "reinforce_plus_plus": (_reinforce_pp, "reinforce_plus_plus"),
    "reinforce_plus_plus_baseline": (_reinforce_pp_baseline, "reinforce_plus_plus_baseline"),
    "remax": (_remax, "remax"),
}
"""The advantage estimators: name -> (the estimator, the verl estimator it reproduces)."""


def register() -> None:
    """Register every ``rlloss_`` policy loss and estimator with verl; safe to call again."""
    for name in POLICY_LOSSES:
        core_algos.register_policy_loss(PREFIX + name)(make_policy_loss(name))
    for name, (fn, _) in ESTIMATORS.items():
        try:
            existing = core_algos.get_adv_estimator_fn(PREFIX + name)
        except ValueError:
            existing = None
        if existing is not None and getattr(existing, "__module__", "").startswith("rlloss."):
            continue  # registered by an earlier import of this module; verl refuses to rebind a name
        core_algos.register_adv_est(PREFIX + name)(fn)


register()
