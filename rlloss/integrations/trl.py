"""TRL's ``GRPOTrainer`` with rlloss's loss and advantages (tested against TRL 1.16).

Change one import::

    # instead of: from trl import GRPOTrainer
    from rlloss.integrations.trl import GRPOTrainer

    args = GRPOConfig(loss_type="dapo", ...)
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=args)
    # or any rlloss objective TRL lacks
    trainer = GRPOTrainer(..., objective=rlloss.GMPO())

With ``objective=None`` the numbers are TRL's own (value and gradient, every ``loss_type``);
``tests/test_integrations_trl.py`` compares both trainers on the same model and batch.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch

import rlloss
from rlloss.objectives import NAMED, _resolve_objective
from rlloss.recipes import RECIPES

from . import missing_trainer

try:
    import trl
    from transformers.utils import is_liger_kernel_available
    from trl.trainer.utils import nanmax, nanmin
except ImportError as exc:  # pragma: no cover - exercised in an environment without trl
    raise missing_trainer("trl", exc) from exc

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
"""The TRL ``loss_type`` values this trainer computes with rlloss."""
PPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
"""The ``loss_type`` values whose surrogate is PPO's clip (the others name their own objective)."""
TRL_EPS = 1e-4
"""TRL's reward-std epsilon (its trainer divides by ``std + 1e-4``)."""
MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
"""The multimodal inputs TRL forwards to the model; rlloss passes them on untouched."""
BACKENDS = ("auto", "torch", "triton")
"""The values of ``backend=``, as every rlloss function takes them."""
COUNT_METRICS = ("num_tokens", "nonfinite_inputs", "positive_logp")
"""``policy_loss``'s metrics that are counts over the call's tokens: logged summed over processes (the
others are means)."""
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")
"""Config fields by which a model's logits differ from ``hidden @ lm_head.weight.T + bias``.

A soft cap or a scale: ``linear_token_logprobs`` computes only that plain product, so such a model
cannot take the hidden-states path.
"""


RECIPE_LOSS_TYPES = {"GRPO": "grpo", "DAPO": "dapo", "Dr. GRPO": "dr_grpo", "GSPO": "grpo", "LUSPO": "luspo",
                     "CISPO": "cispo", "SAPO": "sapo"}
"""TRL's ``loss_type`` for a recipe of ``rlloss.recipes``, by the recipe's name (GSPO is TRL's grpo at
sequence level)."""
AGGREGATION_LOSS_TYPES = {"seq_mean_token_mean": "grpo", "token_mean": "dapo", "constant": "dr_grpo",
                          "seq_mean_token_sum": "luspo"}
"""The ``loss_type`` of a recipe whose objective TRL lacks (GMPO, DPPO), by its aggregation."""
NO_LIGER = "use_liger_kernel=True without liger-kernel"
"""The start of the warning of ``use_liger_kernel=True`` without liger-kernel: a filter on it silences it."""


def recipe_config(recipe: rlloss.Recipe) -> str:
    """How to run ``recipe`` with this trainer: the ``GRPOConfig`` arguments (and ``objective=`` where TRL lacks it)."""
    objective = recipe.objective
    if recipe.name in RECIPE_LOSS_TYPES:
        args = [f"loss_type={RECIPE_LOSS_TYPES[recipe.name]!r}"]
        if isinstance(objective, rlloss.CISPO) and objective.low is None and objective.high is not None:
            args.append(f"epsilon_high={objective.high!r}")  # TRL's CISPO caps the weight at epsilon_high
            objective = None
        elif isinstance(objective, rlloss.SAPO):
            args += [f"sapo_temperature_pos={objective.tau_pos!r}", f"sapo_temperature_neg={objective.tau_neg!r}"]
            objective = None
        elif objective is None:
            args.append(f"epsilon={recipe.eps_low!r}")
            if recipe.eps_high is not None and recipe.eps_high != recipe.eps_low:
                args.append(f"epsilon_high={recipe.eps_high!r}")
            if recipe.level == "sequence":
                args.append("importance_sampling_level='sequence'")
    else:
        args = [f"loss_type={AGGREGATION_LOSS_TYPES.get(recipe.aggregation, 'grpo')!r}"]
    if recipe.beta:
        args.append(f"beta={recipe.beta!r}")
    if recipe.scale != "group":
        args.append(f"scale_rewards={recipe.scale!r}")
    config = f"GRPOConfig({', '.join(args)})"
    return config if objective is None else f"{config} with objective=rlloss.{objective!r}"


def check_objective(objective: object) -> None:
    """``GRPOTrainer``'s ``objective``: None, an rlloss objective or its name; a recipe is TRL's ``loss_type``.

    A recipe (``rlloss.DAPO``, ``"dapo"``, ``"dr_grpo"``, ...) or another TRL loss type's name is a
    ``ValueError`` that names the ``GRPOConfig(loss_type=...)`` which runs it; any other name, the
    objectives there are. Checked when the trainer is built, not at its first step. ``"cispo"``,
    ``"sapo"``, ``"vespo"`` and ``"gmpo"`` name rlloss objectives (with their defaults) as well.
    """
    if objective is None or isinstance(objective, rlloss.Objective):
        return
    if isinstance(objective, str) and objective in NAMED:
        return
    swap = ("objective= swaps the per-token objective inside TRL's loss_type and keeps its normaliser: an rlloss "
            "objective or its name (e.g. objective=rlloss.GMPO() with loss_type='grpo')")
    if isinstance(objective, rlloss.Recipe) or isinstance(objective, str) and objective in RECIPES:
        recipe = RECIPES[objective] if isinstance(objective, str) else objective
        given = repr(objective) if isinstance(objective, str) else f"<recipe {recipe.name}>"
        raise ValueError(f"objective={given} is a recipe, not an objective: with TRL a recipe is its loss_type, "
                         f"{recipe.name} is {recipe_config(recipe)} (TRL's loss types, each run by rlloss: "
                         f"{', '.join(LOSS_TYPES)}); {swap}")
    if isinstance(objective, str) and objective in LOSS_TYPES:
        raise ValueError(f"objective={objective!r} is TRL's loss_type {objective!r}, not an objective: use "
                         f"GRPOConfig(loss_type={objective!r}) with objective=None; {swap}")
    if not isinstance(objective, str):
        raise TypeError(f"objective must be None, an rlloss objective or its name, got {objective!r}; {swap}")
    try:
        _resolve_objective(objective)
    except ValueError as exc:
        raise ValueError(f"{exc}; {swap}; recipes are TRL loss types, GRPOConfig(loss_type=...) "
                         f"({', '.join(LOSS_TYPES)})") from None


def loss_type_objective(trainer: Any) -> rlloss.Objective:
    """The rlloss objective TRL's ``loss_type`` computes, from a ``trl.GRPOTrainer``'s settings.

    grpo, bnpo, dr_grpo, dapo, luspo: ``PPO(eps_low=epsilon, eps_high=epsilon_high or epsilon,
    delta=delta, level=importance_sampling_level)``; cispo: ``CISPO(low=None, high=epsilon_high)``
    (TRL's cap is absolute); sapo: ``SAPO(sapo_temperature_pos, sapo_temperature_neg)``; vespo:
    ``VESPO(vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)``.
    """
    args, loss_type = trainer.args, trainer.loss_type
    if loss_type in PPO_LOSS_TYPES:
        return rlloss.PPO(eps_low=trainer.epsilon_low, eps_high=trainer.epsilon_high, delta=args.delta,
                          level=trainer.importance_sampling_level)
    if loss_type == "cispo":
        return rlloss.CISPO(low=None, high=trainer.epsilon_high)
    if loss_type == "sapo":
        return rlloss.SAPO(tau_pos=args.sapo_temperature_pos, tau_neg=args.sapo_temperature_neg)
    if loss_type == "vespo":
        return rlloss.VESPO(k_pos=args.vespo_k_pos, lam_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg,
                            lam_neg=args.vespo_lambda_neg)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def loss_type_normalizer(loss_type: str, *, mask: torch.Tensor, accumulation_steps: int,
                         steps_per_generation: int, num_processes: int, max_completion_length: int,
                         num_items_in_batch: torch.Tensor | None, training: bool) -> dict[str, Any]:
    """``policy_loss``'s aggregation arguments for TRL's ``loss_type`` on one micro-batch.

    ``GA`` = the current accumulation steps (1 in eval), ``B`` the rows of the micro-batch:
    grpo, sapo: ``seq_mean_token_mean, num_seqs=B*GA``; bnpo: ``token_mean,
    num_tokens=mask.sum()*GA``; dr_grpo: ``constant, max_tokens=max_completion_length,
    num_seqs=B*GA``; dapo, cispo, vespo: ``token_mean, num_tokens=num_items_in_batch/P*GA/spg``
    (``num_items_in_batch`` counts the loss tokens of the whole generation batch on all ``P``
    processes; in eval ``num_items/P``); luspo: ``seq_mean_token_sum, num_seqs=B*GA``. The
    returned loss is already divided for accumulation, as TRL's (``loss_is_scaled_for_ga``).
    """
    ga = accumulation_steps if training else 1
    rows = mask.shape[0] * ga
    if loss_type in ("grpo", "sapo"):
        return {"aggregation": "seq_mean_token_mean", "num_seqs": rows}
    if loss_type == "bnpo":
        return {"aggregation": "token_mean", "num_tokens": mask.sum() * ga}
    if loss_type == "dr_grpo":
        return {"aggregation": "constant", "max_tokens": max_completion_length, "num_seqs": rows}
    if loss_type in ("dapo", "cispo", "vespo"):
        tokens = num_items_in_batch.clamp(min=1.0) / num_processes
        if training:
            tokens = tokens * accumulation_steps / steps_per_generation
        return {"aggregation": "token_mean", "num_tokens": tokens}
    if loss_type == "luspo":
        return {"aggregation": "seq_mean_token_sum", "num_seqs": rows}
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def trl_group_advantages(rewards: torch.Tensor, num_generations: int, scale: str) -> torch.Tensor:
    """TRL's advantages from the summed rewards of the whole generation batch, by ``group_advantages``.

    ``rewards`` ``[N]`` (all processes, groups of ``num_generations`` contiguous), NaN where a
    completion is unscorable (every reward function returned None): those rows are left out of
    their group's mean and std and get advantage 0, as TRL does. ``scale`` is TRL's
    ``scale_rewards`` (group / batch / none), ``eps=1e-4`` as TRL. A group with a single
    scorable row gets 0 (TRL's NaN std, turned into 0).
    """
    scorable = ~torch.isnan(rewards)
    groups = torch.arange(rewards.shape[0], device=rewards.device) // num_generations
    advantages = torch.zeros_like(rewards)
    if bool(scorable.any()):
        advantages[scorable] = rlloss.group_advantages(rewards[scorable], groups=groups[scorable], scale=scale,
                                                       eps=TRL_EPS).to(rewards.dtype)
    return advantages


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is ``rlloss.policy_loss`` and advantages ``rlloss.group_advantages``.

    Same constructor as TRL's plus two keywords:

    * ``objective=None``: TRL's own ``loss_type`` (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo,
      vespo; ``loss_type_objective``) with ``epsilon``/``epsilon_high``, ``delta``,
      ``importance_sampling_level``, ``beta`` (k3 KL on TRL's reference log-probs) and
      ``use_bias_correction_kl``; value and gradient are TRL's. An rlloss objective (an object of
      ``rlloss.objectives`` or its name, e.g. ``rlloss.GMPO()``, ``rlloss.DPPO()``,
      ``rlloss.KLCov()``, ``rlloss.DRO(beta=0.1)``) replaces the surrogate and keeps the
      normaliser that ``loss_type`` implies (``loss_type_normalizer``), TRL's KL, masks and IS
      ratio. GMPO is per sequence: use it with ``loss_type="grpo"`` or ``"sapo"``.
      A recipe is not an objective: ``objective=rlloss.DAPO`` or ``"dapo"`` (DAPO, Dr. GRPO, GRPO, ...)
      is a ``ValueError`` naming its ``GRPOConfig(loss_type=...)`` (``check_objective``).
    * ``backend``: rlloss's ``"auto" | "torch" | "triton"``.

    The log-probs are TRL's (``_get_per_token_logps_and_entropies``, its fused LM head that never
    builds the logits), or with ``use_liger_kernel=True`` rlloss's: ``rlloss.linear_token_logprobs``
    (log-probs and entropies at TRL's ``temperature``, ``backend`` passed through) on the model's last
    hidden states and ``lm_head.weight``/``bias``, the model called through its own forward with
    ``output_hidden_states=True`` and no logits kept (``_logps_from_hidden``); the loss is then
    ``policy_loss`` as above, so every option below works on either source. (Not
    ``policy_loss_from_hidden``: TRL's masks and metrics need the log-probs and entropies before the
    loss, and TRL's entropy bonus is a masked mean whatever the normaliser.) The old and reference
    log-probs stay TRL's, computed without gradient by its fused head. TRL 1.16 deprecates
    ``use_liger_kernel`` (its FutureWarning stays) and with it applies only Liger's layer kernels
    (RMSNorm, RoPE, SwiGLU) at ``train()``: here too when liger-kernel is installed; without it they
    are skipped with a warning (on a copy of ``args``), never an ImportError; the warning's message
    starts with ``NO_LIGER``, which ``warnings.filterwarnings("ignore", message=NO_LIGER)``
    silences. Not supported with it:
    models whose logits are soft-capped or scaled (``final_logit_softcapping``, ``logit_scale``, ...),
    DeepSpeed ZeRO-3, multimodal inputs. TRL's features around the loss go through rlloss's helpers:
    ``top_entropy_quantile`` (``rlloss.distributed.top_entropy_mask``), ``off_policy_mask_threshold``
    (``rlloss.off_policy_mask``), the vLLM importance-sampling ratio (``token_weights``; VESPO folds
    it into its row sum as TRL does), a static ``entropy_coef`` bonus (``rlloss.masked_mean``) and
    the MoE auxiliary loss. Not supported yet, each a ``NotImplementedError`` when the trainer is
    built: ``use_adaptive_entropy``, ``multi_objective_aggregation="normalize_then_sum"``, cispo and sapo
    with ``importance_sampling_level="sequence"``, and vespo with the vLLM correction together
    with a bias-corrected KL.

    Where TRL is not finite rlloss's finite choices stand: log-ratios are clamped at +-20 (a ratio
    of 5e8) in the surrogate, the bias-correction ratio and the k3 KL's exponent, where TRL
    overflows to inf/NaN; a zero normaliser gives 0 (TRL's clamps give 0 too). The metrics TRL
    logs from its loss (``kl``, ``entropy``, ``clip_ratio/*``, ``cispo_clip_ratio``,
    ``vespo/phi_seq_mean``, ``policy_loss``, ``entropy_coef``, ``aux_loss``) are logged under
    the same names; with an explicit objective its rlloss metrics are logged as ``rlloss/<name>``.
    """

    def __init__(self, *args: Any, objective: rlloss.Objective | str | None = None, backend: str = "auto",
                 **kwargs: Any) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_objective(objective)
        # not self.objective: transformers' Trainer uses that name for hyperparameter search
        self.rlloss_objective = objective
        self.rlloss_backend = backend
        self._rlloss_rewards: torch.Tensor | None = None
        super().__init__(*args, **kwargs)
        self._check_supported()
        # use_liger_kernel selects rlloss's log-probs from the hidden states (``_logps_from_hidden``)
        self.rlloss_from_hidden = bool(self.args.use_liger_kernel)
        if self.rlloss_from_hidden and not is_liger_kernel_available():
            # transformers' train() would raise ImportError applying Liger's layer kernels: skip them instead,
            # on a copy of the config (the caller's object is left as it was)
            warnings.warn(f"{NO_LIGER}: the flag makes rlloss compute the loss from the hidden states and lm_head "
                          "(rlloss.linear_token_logprobs then policy_loss, as policy_loss_from_hidden; no logits), "
                          "without Liger's layer kernels (pip install liger-kernel adds them); silence this with "
                          f"warnings.filterwarnings('ignore', message={NO_LIGER!r})", stacklevel=2)
            self.args = copy.copy(self.args)
            self.args.use_liger_kernel = False

    def _check_supported(self) -> None:
        args = self.args
        unsupported = []
        if args.use_liger_kernel:
            unsupported += self._hidden_path_unsupported()
        if self.use_adaptive_entropy:
            unsupported.append("use_adaptive_entropy=True (a static entropy_coef is supported)")
        if self.multi_objective_aggregation != "sum_then_normalize":
            unsupported.append(f"multi_objective_aggregation={self.multi_objective_aggregation!r} "
                               "(only 'sum_then_normalize')")
        if self.rlloss_objective is None:
            loss_type_objective(self)  # rejects an unknown loss_type
            if self.loss_type in ("cispo", "sapo") and self.importance_sampling_level == "sequence":
                unsupported.append(f"loss_type={self.loss_type!r} with importance_sampling_level='sequence'")
        vespo = self._is_vespo()
        if vespo and self.use_vllm and self.vllm_importance_sampling_correction and self.beta != 0.0 \
                and args.use_bias_correction_kl:
            unsupported.append("VESPO with vllm_importance_sampling_correction, beta != 0 and "
                               "use_bias_correction_kl=True together")
        if vespo and self.beta != 0.0 and args.use_bias_correction_kl and self.importance_sampling_level == "sequence":
            unsupported.append("VESPO with importance_sampling_level='sequence' and a bias-corrected KL")
        if unsupported:
            raise NotImplementedError("rlloss.integrations.trl.GRPOTrainer does not support yet: "
                                      + "; ".join(unsupported))
        if self._is_per_row() and self.loss_type not in ("grpo", "sapo"):
            raise ValueError(f"objective {self.rlloss_objective!r} is per sequence (seq_mean_token_mean); use it with "
                             f"loss_type='grpo', got loss_type={self.loss_type!r}")

    def _hidden_path_unsupported(self) -> list[str]:
        """What keeps ``use_liger_kernel=True`` (log-probs from the hidden states) from being exact here."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        unsupported = []
        text_config = self.accelerator.unwrap_model(self.model).config.get_text_config()
        for name in LOGIT_TRANSFORMS:
            value = getattr(text_config, name, None)
            if value is not None and value != 1.0:
                unsupported.append(f"use_liger_kernel=True with a model whose logits are transformed "
                                   f"({name}={value!r}; the loss from hidden states takes hidden @ weight.T + bias)")
        if is_deepspeed_zero3_enabled():
            unsupported.append("use_liger_kernel=True under DeepSpeed ZeRO-3 (the LM head's weight is partitioned)")
        return unsupported

    def _is_vespo(self) -> bool:
        if self.rlloss_objective is None:
            return self.loss_type == "vespo"
        return isinstance(self.rlloss_objective, rlloss.VESPO) or self.rlloss_objective == "vespo"

    def _is_per_row(self) -> bool:
        return isinstance(self.rlloss_objective, rlloss.GMPO) or self.rlloss_objective == "gmpo"

    # --- advantages ---------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rlloss_rewards = rewards_per_func  # all processes' rewards, read once below
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, self._rlloss_rewards = self._rlloss_rewards, None
        if rewards_per_func is None:  # a subclass replaced TRL's reward computation: keep its advantages
            return output
        training = self.model.training
        num_generations = self.num_generations if training else self.num_generations_eval
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        advantages = trl_group_advantages(rewards, num_generations, self.scale_rewards)
        local = output["prompt_ids"].shape[0]
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start:start + local].to(output["advantages"].dtype)
        return output

    # --- loss ---------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        training = self.model.training
        mode = "train" if training else "eval"
        ga = self.current_gradient_accumulation_steps if training else 1
        completion_ids = inputs["completion_ids"]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # tool-output tokens: attended to, not trained on
            mask = mask * inputs["tool_mask"]
        valid = mask.bool()
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        model_inputs = {key: inputs.get(key) for key in MODEL_INPUT_KEYS}
        if self.rlloss_from_hidden:
            logp, entropies, aux_loss = self._logps_from_hidden(model, input_ids, attention_mask, completion_ids,
                                                                valid, self.aux_loss_enabled, model_inputs)
        else:
            logp, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled, **model_inputs,
            )
        adv = inputs["advantages"]
        old = old_input = inputs.get("old_per_token_logps")
        weights, entropy_mask = self._token_weights(logp, old, adv, valid, entropies, inputs)
        objective = loss_type_objective(self) if self.rlloss_objective is None else self.rlloss_objective
        if self._is_vespo() and self._vllm_is():
            # TRL folds the engine's ratio into VESPO's row sum: log w = sum_t (d + clamp(log isr))
            isr = inputs["importance_sampling_ratio"]
            log_isr = torch.clamp(torch.log(isr), math.log(1e-8), 20.0)
            old = (logp.detach() if old is None else old) - log_isr
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        normaliser = loss_type_normalizer(
            self.loss_type, mask=valid, accumulation_steps=self.current_gradient_accumulation_steps,
            steps_per_generation=self.args.steps_per_generation, num_processes=self.accelerator.num_processes,
            max_completion_length=self.max_completion_length, num_items_in_batch=inputs.get("num_items_in_batch"),
            training=training,
        )
        result = rlloss.policy_loss(
            logp, old, adv, valid, objective=objective, ref_logp=ref, beta=self.beta, kl="k3",
            kl_bias_correction=bool(self.args.use_bias_correction_kl), token_weights=weights,
            backend=self.rlloss_backend,
            **normaliser,
        )
        loss = result.loss
        if self._entropy_bonus_enabled:
            effective = valid if entropy_mask is None else valid & entropy_mask
            loss = loss - self.entropy_coef * rlloss.masked_mean(entropies, effective) / ga
            # TRL logs the policy term before its division by accumulation (dapo-type: after)
            scale = 1 if self.loss_type in ("dapo", "cispo", "vespo") else ga
            policy_term = (result.loss * scale).detach()
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_term).nanmean().item())
            if training and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / ga
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_loss_metrics(mode, logp.detach(), old_input, adv, valid, entropies.detach(), result, inputs)
        return loss

    def _logps_from_hidden(self, model, input_ids, attention_mask, completion_ids, valid, compute_aux_loss,
                           model_inputs):
        """``(logp, entropy, aux_loss)`` of the completions by ``rlloss.linear_token_logprobs``: no logits.

        The model runs through its own (wrapped) forward with ``output_hidden_states=True`` and an empty
        ``logits_to_keep``, so its LM head projects no position; the last hidden states before each
        completion token, ``lm_head.weight`` and ``lm_head.bias`` then give the log-probs and entropies
        at TRL's temperature, on ``valid`` tokens only (0 elsewhere). With ``cast_lm_head_to_fp32`` the
        hidden states are cast to fp32 as TRL does; otherwise the head is cast to the hidden states'
        dtype (what autocast does to the model's own head).
        """
        if any(value is not None for value in model_inputs.values()):
            given = sorted(key for key, value in model_inputs.items() if value is not None)
            raise NotImplementedError("rlloss.integrations.trl.GRPOTrainer does not support yet: use_liger_kernel=True "
                                      f"with multimodal inputs ({', '.join(given)})")
        length = completion_ids.size(1)
        call = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                    logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device))
        if compute_aux_loss:
            call["output_router_logits"] = True
        with self.accelerator.autocast():
            outputs = model(**call)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        weight, bias = head.weight, head.bias
        if _is_dtensor(weight):  # FSDP2: the whole head (its gradient goes back to the shards), as TRL's head does
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        # position P - 1 + t scores completion token t
        hidden = outputs.hidden_states[-1][:, -length - 1:-1].to(weight.device)
        if self.args.cast_lm_head_to_fp32:
            hidden = hidden.float()
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            logp, entropies = rlloss.linear_token_logprobs(
                hidden, weight, completion_ids.to(weight.device), bias=bias, temperature=self.temperature,
                mask=valid.to(weight.device), return_entropy=True, backend=self.rlloss_backend,
                entropy_grad=bool(self._entropy_bonus_enabled))  # else a metric and a mask: one recompute fewer
        return logp, entropies, (outputs.aux_loss if compute_aux_loss else None)

    def _vllm_is(self) -> bool:
        return bool(self.use_vllm and self.vllm_importance_sampling_correction)

    def _token_weights(self, logp, old, adv, valid, entropies, inputs):
        """The product of TRL's keep-masks and vLLM IS ratio as ``token_weights`` (None when none apply)."""
        weights = None
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = rlloss.distributed.top_entropy_mask(
                entropies.detach(), valid, fraction=self.top_entropy_quantile,
                group=torch.distributed.group.WORLD if self.accelerator.num_processes > 1 else None,
            )
            weights = entropy_mask.to(logp.dtype)
        if self.off_policy_mask_threshold is not None:
            if adv.dim() != 1:
                raise ValueError("off_policy_mask_threshold needs one advantage per sequence ([B]), "
                                 f"got advantages of shape {list(adv.shape)}")
            sampling = inputs.get("sampling_per_token_logps", logp.detach() if old is None else old)
            keep = rlloss.off_policy_mask(logp.detach(), sampling, adv, valid, threshold=self.off_policy_mask_threshold)
            keep = keep.to(logp.dtype)[:, None].expand_as(logp)
            weights = keep if weights is None else weights * keep
        if self._vllm_is() and not self._is_vespo():
            isr = inputs["importance_sampling_ratio"].detach().to(logp.dtype).expand_as(logp)
            weights = isr if weights is None else weights * isr
        return (None if weights is None else weights.contiguous()), entropy_mask

    def _global_mean(self, total: torch.Tensor, count: torch.Tensor) -> float:
        totals = self.accelerator.reduce(torch.stack([total.float(), count.float()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_loss_metrics(self, mode, logp, old, adv, valid, entropies, result, inputs) -> None:
        """TRL's loss metrics under TRL's names (global over processes, as TRL reduces them)."""
        metrics = self._metrics[mode]
        tokens = valid.sum()
        if self.beta != 0.0:
            metrics["kl"].append(self._global_mean(result.metrics["kl_mean"] * tokens, tokens))
        metrics["entropy"].append(self._global_mean(torch.where(valid, entropies, 0.0).sum(), tokens))
        if self.rlloss_objective is not None:
            for name, value in sorted(result.metrics.items()):
                if name in COUNT_METRICS:  # counts, summed over processes, not per-token means
                    metrics[f"rlloss/{name}"].append(self.accelerator.reduce(value.float(), reduction="sum").item())
                elif name != "kl_mean":
                    metrics[f"rlloss/{name}"].append(self._global_mean(value * tokens, tokens))
            return
        a = adv if adv.dim() == 2 else adv[:, None]
        d = logp - (logp if old is None else old)
        sequence = self.importance_sampling_level == "sequence"
        if sequence:  # one ratio per row: TRL averages these flags over rows, not tokens
            d = (torch.where(valid, d, 0.0).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1))
        ratio = torch.exp(d)

        def global_mean(flag: torch.Tensor) -> float:
            flag = flag.float()
            if sequence:
                return self._global_mean(flag.sum(), torch.tensor(float(flag.shape[0]), device=flag.device))
            return self._global_mean(torch.where(valid, flag, 0.0).sum(), tokens)

        def row_means(flag: torch.Tensor) -> torch.Tensor:
            flag = flag.float()
            if sequence:
                return flag.squeeze(1)
            return torch.where(valid, flag, 0.0).sum(-1) / valid.sum(-1)  # NaN for an empty row, skipped below

        if self.loss_type in PPO_LOSS_TYPES:
            low = (ratio < 1 - self.epsilon_low) & (a < 0)
            high = (ratio > 1 + self.epsilon_high) & (a > 0)
            metrics["clip_ratio/low_mean"].append(global_mean(low))
            metrics["clip_ratio/high_mean"].append(global_mean(high))
            metrics["clip_ratio/region_mean"].append(global_mean(low | high))
            metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(row_means(low))).item())
            metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(row_means(high))).item())
        elif self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_mean((ratio > self.epsilon_high) & (a > 0)))
        elif self.loss_type == "vespo":
            phi = self.get_gamma_weights(
                advantages=a, log_ratio_per_token=logp - (logp if old is None else old), mask=valid.to(logp.dtype),
                importance_sampling_ratio=inputs.get("importance_sampling_ratio") if self._vllm_is() else None,
                k_pos=self.args.vespo_k_pos, lambda_pos=self.args.vespo_lambda_pos, k_neg=self.args.vespo_k_neg,
                lambda_neg=self.args.vespo_lambda_neg,
            )
            metrics["vespo/phi_seq_mean"].append(
                self._global_mean(phi.sum(), torch.tensor(float(phi.shape[0]), device=phi.device)))
