"""The dispatch layer's side of the Triton backend: rlloss's options turned into the ops' arguments.

The public functions validate, pick a backend (``_dispatch.resolve_backend``) and, for
``"triton"``, call the functions here, which translate objectives, kinds, aggregations and counts
into the plain codes and numbers of the ``torch.ops.rlloss.*`` ops (``rlloss.kernels.ops``) and
shape the results back (metrics as a dict). What the kernels do not run is decided here too, not
in a kernel module: fp64 inputs (``fused_dtype``) and objectives without a fused kernel
(``fused_support``) go to the reference.

``rlloss.kernels.ops`` is imported on first use: importing it imports triton, which ``import
rlloss`` must not need.
"""

from __future__ import annotations

import torch

from ._constants import AGGREGATION_CODES, KL_KIND_CODES, OBJECTIVE_CODES, SCALE_CODES, VESPO_MIN_LAM
from .objectives import CISPO, DPPO, DRO, GMPO, PPO, SAPO, VESPO, ClipCov, KLCov, Objective, Reinforce



def ops():
    """``torch.ops.rlloss``, registered on first use."""
    import rlloss.kernels.ops  # noqa: F401

    return torch.ops.rlloss


def fused_dtype(*tensors: torch.Tensor | None) -> bool:
    """False when any input is fp64: the kernels accumulate in fp32 by design, fp64 runs the reference."""
    return not any(t is not None and t.dtype == torch.float64 for t in tensors)


def fused_support(objective: Objective, kl_bias_correction: bool, *, per_token: bool = False) -> str | None:
    """None when the fused kernels run this configuration, else what they do not run (said in errors).

    ``per_token``: the caller wants the objective's per-token loss (the ``*_surrogate`` functions);
    GMPO has none (its loss is per row), while ``policy_loss`` runs it fused from its row statistics.
    ``kl_bias_correction`` runs fused at both levels (at sequence level through the row mean).
    """
    if isinstance(objective, (KLCov, ClipCov)):
        return (f"{type(objective).__name__}: it selects tokens across the whole batch (top-k or a seeded "
                "random draw), which the reference does in PyTorch")
    if per_token and isinstance(objective, GMPO):
        return "gmpo_surrogate: GMPO's loss is per row ([B]); policy_loss runs GMPO fused"
    return None


def objective_switches(objective: Objective) -> tuple[dict, tuple[str, ...]]:
    """The fused kernel's arguments for an objective, and the metric names of its three indicator slots.

    ``params`` by objective: PPO ``1-eps_low, 1+eps_high``, the dual clip, delta (the two flags say
    whether the last two are set); CISPO low, high (flags: set or not); SAPO tau_pos, tau_neg; DPPO
    low, high, weight_cap; DRO beta; VESPO k_pos, lam_pos, k_neg, lam_neg; GMPO log_clip_low,
    log_clip_high. ``row_stat``: 1 GSPO, 2 VESPO, 3 GMPO (``kernels.policy_loss``'s row statistics).
    """
    def args(name, params=(), flags=(False, False), row_stat=0):
        params = [float(p) for p in params] + [0.0] * (4 - len(params))
        return dict(objective=OBJECTIVE_CODES[name], dual_or_low=flags[0], delta_or_high=flags[1], params=params,
                    row_stat=row_stat)

    if isinstance(objective, PPO):
        return (args("ppo", (1 - objective.eps_low, 1 + objective.high, objective.dual_clip or 0.0,
                             objective.delta or 0.0), (objective.dual_clip is not None, objective.delta is not None),
                     1 if objective.level == "sequence" else 0),
                ("clip_low", "clip_high", "clip_dual"))
    if isinstance(objective, CISPO):
        return (args("cispo", (objective.low or 0.0, objective.high or 0.0),
                     (objective.low is not None, objective.high is not None)), ("clip_low", "clip_high"))
    if isinstance(objective, SAPO):
        return args("sapo", (objective.tau_pos, objective.tau_neg)), ()
    if isinstance(objective, Reinforce):
        return args("reinforce"), ()
    if isinstance(objective, DPPO):
        name = "dppo_tv" if objective.divergence == "tv" else "dppo_kl"
        return args(name, (objective.low, objective.high, objective.weight_cap)), ("outside_region",)
    if isinstance(objective, DRO):
        return args("dro", (objective.beta,)), ()
    if isinstance(objective, VESPO):
        return args("vespo", (objective.k_pos, max(objective.lam_pos, VESPO_MIN_LAM), objective.k_neg,
                              max(objective.lam_neg, VESPO_MIN_LAM)), row_stat=2), ()
    if isinstance(objective, GMPO):
        return args("gmpo", (objective.log_clip_low, objective.log_clip_high), row_stat=3), ()
    raise ValueError(f"no fused kernel for objective {type(objective).__name__}")


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _count(value: float | torch.Tensor | None) -> tuple[torch.Tensor | None, float]:
    """A count as the ops take it: (tensor or None, number; < 0 when not given)."""
    if isinstance(value, torch.Tensor):
        return value.detach(), 0.0
    return None, -1.0 if value is None else float(value)


def _metrics(metrics: torch.Tensor, slots: tuple[str, ...], has_kl: bool) -> dict[str, torch.Tensor]:
    """The metrics dict from the combine's ``metrics[N_METRICS]`` (the order of ``kernels.policy_loss``)."""
    out = {name: metrics[i] for i, name in enumerate(slots)}
    out["ratio_mean"] = metrics[3]
    if has_kl:
        out["kl_mean"] = metrics[4]
    out["num_tokens"] = metrics[6]
    out["nonfinite_inputs"] = metrics[7]
    out["positive_logp"] = metrics[8]
    return out


def policy_loss_triton(logp, old_logp, adv, mask, objective, ref_logp, beta, kl, kl_bias_correction, token_weights,
                       max_log_ratio, aggregation, max_tokens, num_tokens, num_seqs, dp_size):
    """The fused ``policy_loss`` on validated inputs (``fused_support`` is None): ``(loss, metrics)``.

    Only ``logp`` receives a gradient; the others are constants, as in the reference. The gradient
    buffer is written only when a gradient will be asked for (grad mode on and ``logp`` requiring it).
    """
    switches, slots = objective_switches(objective)
    tok, tok_value = _count(num_tokens)
    seq, seq_value = _count(num_seqs)
    loss, metrics, _, _, _ = ops().policy_loss(
        logp, _detach(old_logp), adv.detach(), mask, _detach(ref_logp), _detach(token_weights), tok, seq,
        **switches, beta=float(beta), kl_kind=KL_KIND_CODES[kl], kl_bias_correction=ref_logp is not None and kl_bias_correction,
        max_log_ratio=float(max_log_ratio), aggregation=AGGREGATION_CODES[aggregation],
        max_tokens=float(max_tokens or 1.0), num_tokens_value=tok_value, num_seqs_value=seq_value, dp_size=dp_size,
        needs_grad=_needs_grad(logp),
    )
    return loss, _metrics(metrics, slots, ref_logp is not None)


def objective_surrogate_triton(objective, logp, old_logp, adv, mask, max_log_ratio) -> torch.Tensor:
    """Per-token loss ``[B, T]`` fp32 of a fused objective on validated inputs."""
    switches, _ = objective_switches(objective)
    loss, _ = ops().objective_surrogate(logp, _detach(old_logp), adv.detach(), mask, **switches,
                                        max_log_ratio=float(max_log_ratio), needs_grad=_needs_grad(logp))
    return loss


def kl_estimate_triton(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    value, _ = ops().kl_estimate(logp, ref_logp.detach(), KL_KIND_CODES[kind], _needs_grad(logp))
    return value


def masked_mean_triton(x, mask, dim, normalizer) -> torch.Tensor:
    tensor, value = (normalizer.detach(), 0.0) if isinstance(normalizer, torch.Tensor) else (
        None, -1.0 if normalizer is None else float(normalizer))
    mean, _ = ops().masked_mean(x, mask, dim if dim is None or dim >= 0 else dim + x.dim(), tensor, value)
    return mean


def group_advantages_triton(rewards, groups, baseline, scale, eps, singleton) -> torch.Tensor:
    ids, size = (None, groups) if isinstance(groups, int) else (groups, 0)
    adv, _, _ = ops().group_advantages(rewards, ids, size, baseline == "loo", SCALE_CODES[scale], float(eps),
                                       singleton == "keep")
    return adv


def dynamic_sampling_mask_triton(rewards, groups) -> torch.Tensor:
    ids, size = (None, groups) if isinstance(groups, int) else (groups, 0)
    return ops().dynamic_sampling_mask(rewards, ids, size)


def soft_overlong_penalty_triton(lengths, max_len, cache_len, factor) -> torch.Tensor:
    return ops().soft_overlong_penalty(lengths, float(max_len), float(cache_len), float(factor))


def token_logprobs_triton(logits, ids, temperature, return_entropy, inplace_backward=False):
    logp, entropy, _ = ops().token_logprobs(logits, ids, float(temperature), return_entropy, inplace_backward)
    return logp, entropy if return_entropy else None


def policy_loss_from_logits_triton(logits, ids, temperature, entropy_coef, inplace_backward, old_logp, adv, mask,
                                   objective, ref_logp, beta, kl, kl_bias_correction, token_weights, max_log_ratio,
                                   aggregation, max_tokens, num_tokens, num_seqs, dp_size):
    """The fused ``policy_loss_from_logits`` on validated inputs: ``(loss, metrics)``, metrics with
    ``entropy_mean``. Ids are read only where ``mask`` is True."""
    switches, slots = objective_switches(objective)
    tok, tok_value = _count(num_tokens)
    seq, seq_value = _count(num_seqs)
    loss, metrics, *_ = ops().policy_loss_from_logits(
        logits, ids, mask, _detach(old_logp), adv.detach(), _detach(ref_logp), _detach(token_weights), tok, seq,
        float(temperature), float(entropy_coef), inplace_backward, **switches, beta=float(beta),
        kl_kind=KL_KIND_CODES[kl], kl_bias_correction=ref_logp is not None and kl_bias_correction,
        max_log_ratio=float(max_log_ratio), aggregation=AGGREGATION_CODES[aggregation],
        max_tokens=float(max_tokens or 1.0), num_tokens_value=tok_value, num_seqs_value=seq_value, dp_size=dp_size,
        needs_grad=_needs_grad(logits),
    )
    return loss, {**_metrics(metrics, slots, ref_logp is not None), "entropy_mean": metrics[5]}


# --- the loss from hidden states ---------------------------------------------------------------------


def linear_token_logprobs_triton(hidden, weight, bias, ids, valid, temperature, group, vocab_start, entropy_grad):
    """``(logp, entropy)`` fp32 ``[N]`` of validated ``hidden [N, H]``, ``ids [N]``; ``group`` None or the
    vocabulary-parallel group (``vocab_start``: this rank's first id).

    When ``hidden`` will receive a gradient and the entropy will not (``entropy_grad`` False), the
    forward also forms ``d logp / d hidden`` (vocabulary-parallel: each shard's part, summed over
    the group in the forward): backward then recomputes the logits once, for ``d weight``, instead
    of twice. That fp32 ``[N, H]`` has the size of the ``d hidden`` accumulator it replaces, but
    lives from the forward to the backward: several such losses alive before one backward each hold
    one.
    """
    hidden_grad = _needs_grad(hidden) and not entropy_grad
    if group is None:
        logp, entropy, *_ = ops().linear_token_logprobs(hidden, weight, bias, ids, valid, float(temperature),
                                                        hidden_grad)
        return logp, entropy
    return _ShardedLinearLogprobs.apply(hidden, weight, bias, ids, valid, vocab_start, float(temperature), group,
                                        hidden_grad)


def _finish_stats(m, s, u, zt):
    from .kernels.linear_logprobs import finish_stats

    return finish_stats(m, s, u, zt)


class _ShardedLinearLogprobs(torch.autograd.Function):
    """The fused kernels on this rank's shard; only ``[N]`` statistics cross ranks, and ``d hidden``
    (in backward, or with ``hidden_grad`` the forward's ``d logp / d hidden``, summed once in the
    forward: backward then needs no collective and no recompute for ``d hidden``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, valid, vocab_start, temperature, group, hidden_grad):
        dist = torch.distributed
        m, s, u, zt, acc, sx = ops().linear_stats(hidden, weight, bias, ids, valid, vocab_start, temperature,
                                                  hidden_grad)
        big_m = m.clone()
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
        scale = torch.exp(m - big_m)
        rows = [s * scale, (u + s * (m - big_m)) * scale, zt]  # u, s rebased on the global max
        parts = torch.stack(rows + [sx * scale] if hidden_grad else rows)
        dist.all_reduce(parts, group=group)
        logp, entropy, log_s = _finish_stats(big_m, parts[0], parts[1], parts[2])
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)  # each rank's (0, 1, 0, 0) at padding sums to s = world
        logp, entropy = torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
        if hidden_grad:  # this shard's part of d logp / d hidden, then the sum: the same on every rank
            local = ids - vocab_start
            own = valid & (local >= 0) & (local < weight.shape[0])
            coef = torch.where(valid, -scale / parts[0], zero)
            ops().linear_finish_logp_hidden_grad_(acc, weight, ids, vocab_start, coef,
                                                  torch.where(own, parts[3] / parts[0], zero), temperature)
            dist.all_reduce(acc, group=group)
        ctx.save_for_backward(hidden, weight, bias, ids, valid, vocab_start, entropy, big_m, log_s, acc)
        ctx.temperature, ctx.group, ctx.hidden_grad = temperature, group, hidden_grad
        ctx.set_materialize_grads(False)
        if hidden_grad:  # formed on the promise that the entropy carries no gradient
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, ids, valid, vocab_start, entropy, m, log_s, dlogp_dh = ctx.saved_tensors
        if g_logp is None:
            g_logp = torch.zeros_like(m)
        if ctx.hidden_grad:  # d hidden is the forward's, whole: no collective (the entropy is not differentiable)
            need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
            dh, dw, db = ops().linear_grads(hidden, weight, bias, ids, valid, vocab_start, m, log_s, entropy,
                                            g_logp, None, ctx.temperature, False, dlogp_dh, True, need_w)
            return (dh, dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None,
                    None, None, None, None, None, None)
        dh32, dw, db = ops().linear_grads(hidden, weight, bias, ids, valid, vocab_start, m, log_s, entropy,
                                          g_logp, g_entropy, ctx.temperature, True)
        torch.distributed.all_reduce(dh32, group=ctx.group)  # summed in fp32, rounded once
        return dh32.to(hidden.dtype), dw, db if bias is not None else None, None, None, None, None, None, None
