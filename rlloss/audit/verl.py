"""``audit_verl``: the objective verl's actor loss optimises for an ``ActorConfig``, from verl's own code.

Each micro-batch goes through ``verl.workers.utils.losses.ppo_loss``, the function verl's engine
workers call: it writes ``global_batch_info`` into the config, calls the registered policy loss
(``policy_loss.loss_mode``) and its ``agg_loss`` with ``loss_agg_mode``, ``dp_size``,
``batch_num_tokens``, ``global_batch_size`` and ``loss_scale_factor``, and adds verl's own KL term.
The micro-batch is laid out as verl's engine hands it over: log-probs in the no-padding layout
(each row's prompt, then its response, shifted by one), the other fields padded to the batch's
response width, and the step's counts as verl's engine computes them
(``workers/engine/fsdp/transformer_impl.py``, ``forward_backward_batch``: ``batch_num_tokens`` is the
mini-batch's loss tokens all-reduced over the data-parallel group, ``dp_size`` its size;
``trainer/ppo/ray_trainer.py``, ``_update_actor``: ``global_batch_size = ppo_mini_batch_size *
rollout.n``, every sequence of the mini-batch). The engine calls ``loss.backward()`` on each
micro-batch unscaled and FSDP averages over ranks: the audit's step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .measure import _call_loss_fn, _check_int, accumulate, audit_steps
from .probe import Batch, Split
from ..integrations import EXTRAS
from .result import Audit

PROMPT = 1  # prompt tokens per row: verl's layout needs at least one


def _import_verl() -> Any:
    try:
        import verl
        from verl.workers.config import ActorConfig
    except ImportError as exc:
        raise ImportError(f"rlloss.audit.audit_verl needs verl, which failed to import ({exc}); install the tested "
                          f"version with: {EXTRAS['verl']} (in the root of rlloss's checkout)") from exc
    return verl, ActorConfig


def verl_loss_fn(actor_config: Any) -> Callable[..., torch.Tensor]:
    """One micro-batch's loss through verl's ``ppo_loss``, as ``audit_loss`` calls a loss."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    def loss_fn(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                window: Any) -> torch.Tensor:
        rows, width = mask.shape
        lengths = mask.sum(-1).tolist()
        pad = logp.new_zeros(PROMPT - 1)
        tail = logp.new_zeros(1)
        # verl's no-padding layout: the log-prob of response token t sits at position prompt + t - 1
        flat = torch.cat([torch.cat([pad, logp[i, :n], tail]) for i, n in enumerate(lengths)])
        fields = {
            "prompts": torch.ones(rows, PROMPT, dtype=torch.long),
            "responses": torch.ones(rows, width, dtype=torch.long),
            "attention_mask": torch.cat([torch.ones(rows, PROMPT, dtype=torch.long), mask.long()], 1),
            "response_mask": mask.long(),
            "old_log_probs": old_logp,
            "advantages": adv[:, None].expand(rows, width) * mask,  # verl's advantages are per token, 0 on padding
        }
        if actor_config.use_kl_loss:
            fields["ref_log_prob"] = old_logp  # at the reference: the KL and its gradient are 0
        data = TensorDict(fields, batch_size=[rows])
        tu.assign_non_tensor_data(data, "dp_size", window.dp_size)
        tu.assign_non_tensor_data(data, "batch_num_tokens", window.num_tokens)
        tu.assign_non_tensor_data(data, "global_batch_size", window.num_seqs)
        loss, _ = ppo_loss(actor_config, {"log_probs": flat}, data)
        return loss

    return loss_fn


def audit_verl(actor_config: Any, *, micro_batches: int = 2, dp_size: int = 2, response_length: int = 64,
               seed: int = 0) -> Audit:
    """Audit verl's actor loss for ``actor_config`` (a ``verl.workers.config.ActorConfig``), through ``ppo_loss``.

    One optimizer step (a PPO mini-batch) is ``micro_batches`` micro-batches on each of
    ``dp_size`` ranks; responses are padded to ``response_length`` (the rollout's width: verl pads
    every response to it), probe rows are at most that long, and ``constant`` is a candidate with
    ``max_tokens = loss_scale_factor`` when the config sets it, else ``response_length`` (what
    ``agg_loss`` divides by: the padded width). With ``use_dynamic_bsz`` micro-batches may hold
    different row counts; without it they hold equal ones. The policy loss is the config's
    ``policy_loss.loss_mode`` (verl's registry: rlloss's ``rlloss_*`` losses too, once
    ``rlloss.integrations.verl`` is imported).

    Args:
        actor_config: the ``ActorConfig`` to audit; ``ppo_loss`` writes its ``global_batch_info``.
        micro_batches: micro-batches per rank in one mini-batch, >= 1.
        dp_size: data-parallel ranks, >= 1.
        response_length: the padded response width, >= 1.
        seed: seeds the probe.

    Returns:
        the ``Audit``, labelled with verl's version, the loss and aggregation modes and the step's shape.
    """
    verl, actor_config_cls = _import_verl()
    if not isinstance(actor_config, actor_config_cls):
        raise TypeError(f"actor_config must be a verl.workers.config.ActorConfig, got {type(actor_config).__name__}")
    _check_int("micro_batches", micro_batches, 1)
    _check_int("dp_size", dp_size, 1)
    _check_int("response_length", response_length, 1)
    _check_int("seed", seed, 0)
    scale_factor = actor_config.loss_scale_factor
    max_tokens = int(scale_factor) if scale_factor is not None else response_length
    loss_mode = actor_config.policy_loss.get("loss_mode", "vanilla")
    label = (f"verl {verl.__version__} ppo_loss: loss_mode={loss_mode!r}, "
             f"loss_agg_mode={actor_config.loss_agg_mode!r}, loss_scale_factor={scale_factor}, "
             f"{micro_batches} micro-batches x {dp_size} ranks")
    run_piece = _call_loss_fn(verl_loss_fn(actor_config))

    def step(batch: Batch, split: Split) -> tuple[float, torch.Tensor]:
        return accumulate(batch, split, run_piece, max_tokens)

    return audit_steps(step, micro_batches=micro_batches, dp_size=dp_size, max_tokens=max_tokens, seed=seed,
                       longest=response_length, width=response_length,
                       equal_rows=not actor_config.use_dynamic_bsz, label=label)
