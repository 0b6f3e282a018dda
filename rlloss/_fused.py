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


def _tile_rows(hidden: torch.Tensor, weight: torch.Tensor, n: int, max_tile_bytes: int | None, group) -> int:
    """Tokens per logits tile: from ``max_tile_bytes`` or its default (``kernels.linear_logprobs``)."""
    from .kernels.linear_logprobs import default_tile_bytes, sharded_tile_rows, tile_tokens

    V, H, elem = weight.shape[0], hidden.shape[-1], hidden.element_size()
    if max_tile_bytes is not None:
        return tile_tokens(n, V, max_tile_bytes)
    if group is not None:  # the same on every rank, whatever its shard
        return min(max(n, 1), sharded_tile_rows(H, elem))
    return tile_tokens(n, V, default_tile_bytes(n, V, H, elem))


def _same_rows_on_every_rank(rows: int, device: torch.device, group) -> None:
    """Device-side check that the ranks of ``group`` tile alike (a given ``max_tile_bytes`` over shards of
    different sizes may not): each chunk's statistics are combined across ranks."""
    both = torch.tensor([rows, -rows], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=group)
    torch._assert_async(both[0] == -both[1], "max_tile_bytes gives the ranks of group tiles of different heights "
                                             "(shards of different sizes): pass a budget whose 4 * V_r-byte rows "
                                             "give every rank the same number of tokens, or None")


def _sharded_steps(group):
    """``TileSteps`` of a vocabulary-parallel head: the tile ops, and the collectives between them."""
    from .kernels.linear_logprobs import TileSteps, combine_shards

    dist = torch.distributed

    def combine(m, s, u, zt):
        big_m = m.clone()
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
        parts = combine_shards(m, s, u, zt, big_m)
        dist.all_reduce(parts, group=group)
        return big_m, parts[0], parts[1], parts[2]

    def sum_rows(x):
        dist.all_reduce(x, group=group)  # fp32 partial sums, rounded once afterwards
        return x

    return TileSteps(stats=ops().linear_tile_stats, grad_=ops().linear_tile_grad_, combine=combine, sum_rows=sum_rows)


def linear_token_logprobs_triton(hidden, weight, bias, ids, valid, temperature, group, vocab_start, max_tile_bytes):
    """``(logp, entropy)`` fp32 ``[N]`` of validated ``hidden`` (``[N, H]`` or ``[B, T, H]``), ``ids`` and
    ``valid`` ``[N]``; ``group`` None or the vocabulary-parallel group (``vocab_start``: this rank's
    first id). The general path: statistics in the forward, each tile recomputed in backward."""
    rows = _tile_rows(hidden, weight, ids.numel(), max_tile_bytes, group)
    if group is None:
        logp, entropy, _ = ops().linear_logprobs(hidden, weight, bias, ids, valid, float(temperature), rows)
        return logp, entropy
    if max_tile_bytes is not None:
        _same_rows_on_every_rank(rows, hidden.device, group)
    return _ShardedLinearLogprobs.apply(hidden, weight, bias, ids, valid, vocab_start, float(temperature), group, rows)


def _upstream_of(g_logp, g_entropy):
    """``run_chunks``' ``upstream`` for given per-token gradients ``[N]`` (``g_entropy`` None: none)."""
    def upstream(idx, ok, logp, entropy):
        zero = torch.zeros((), dtype=torch.float32, device=ok.device)
        g_e = None if g_entropy is None else torch.where(ok, g_entropy.index_select(0, idx).float(), zero)
        return torch.where(ok, g_logp.index_select(0, idx).float(), zero), g_e

    return upstream


class _ShardedLinearLogprobs(torch.autograd.Function):
    """The general path over this rank's shard; per chunk, only ``[C]`` statistics cross ranks in the
    forward, and ``d hidden``'s fp32 ``[C, H]`` partial sums in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, valid, vocab_start, temperature, group, rows):
        from .kernels.linear_logprobs import run_chunks

        chunks = run_chunks(hidden, weight, bias, ids, valid, temperature, rows, vocab_start=vocab_start,
                            steps=_sharded_steps(group))
        ctx.save_for_backward(hidden, weight, bias, ids, valid, vocab_start, chunks.entropy, chunks.lse)
        ctx.temperature, ctx.group, ctx.rows = temperature, group, rows
        ctx.set_materialize_grads(False)
        return chunks.logp, chunks.entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        from .kernels.linear_logprobs import run_chunks

        hidden, weight, bias, ids, valid, vocab_start, entropy, lse = ctx.saved_tensors
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        chunks = run_chunks(hidden, weight, bias, ids, valid, ctx.temperature, ctx.rows,
                            upstream=_upstream_of(g_logp, g_entropy), known=(lse, entropy), need_hidden=need_h,
                            need_weight=need_w, vocab_start=vocab_start, steps=_sharded_steps(ctx.group))
        return (*_grads_in_dtypes(chunks, hidden, weight, bias, ctx.needs_input_grad), None, None, None, None, None,
                None)


def _grads_in_dtypes(chunks, hidden, weight, bias, needs):
    """``run_chunks``' fp32 gradients in their inputs' dtypes, None where not asked for."""
    return (chunks.d_hidden.to(hidden.dtype) if needs[0] else None,
            chunks.d_weight.to(weight.dtype) if needs[1] else None,
            chunks.d_bias.to(bias.dtype) if needs[2] and bias is not None else None)


def token_local(objective: Objective, kl_bias_correction: bool) -> bool:
    """True when d loss / d logp at a token needs only that token (no row or batch statistic): the
    loss from hidden states can then form its gradient in the forward (``kernels.from_hidden``)."""
    return fused_support(objective, kl_bias_correction) is None and objective_switches(objective)[0]["row_stat"] == 0


def policy_loss_from_hidden_triton(hidden, weight, bias, ids, mask, temperature, entropy_coef, group, vocab_start,
                                   max_tile_bytes, token_scale, old_logp, adv, objective, ref_logp, beta, kl,
                                   kl_bias_correction, token_weights, max_log_ratio, aggregation, max_tokens,
                                   num_tokens, num_seqs, dp_size):
    """The loss path of ``policy_loss_from_hidden`` (``token_local`` objectives) on validated inputs:
    ``(loss, metrics)``, metrics with ``entropy_mean``. The gradients of ``hidden``, ``weight`` and
    ``bias`` are formed in the forward when grad mode is on and they require one; backward scales them."""
    switches, slots = objective_switches(objective)
    tok, tok_value = _count(num_tokens)
    seq, seq_value = _count(num_seqs)
    rows = _tile_rows(hidden, weight, ids.numel(), max_tile_bytes, group)
    need_h = _needs_grad(hidden)
    need_w = _needs_grad(weight) or (bias is not None and _needs_grad(bias))
    loss_args = dict(**switches, beta=float(beta), kl_kind=KL_KIND_CODES[kl],
                     kl_bias_correction=ref_logp is not None and kl_bias_correction, max_log_ratio=float(max_log_ratio),
                     aggregation=AGGREGATION_CODES[aggregation], max_tokens=float(max_tokens or 1.0),
                     num_tokens_value=tok_value, num_seqs_value=seq_value, dp_size=dp_size)
    inputs = (_detach(old_logp), adv.detach(), _detach(ref_logp), _detach(token_weights), token_scale, tok, seq)
    if group is None:
        loss, metrics, *_ = ops().linear_policy_loss(hidden, weight, bias, ids, mask, *inputs, float(temperature),
                                                     float(entropy_coef), rows, need_h, need_w, **loss_args)
    else:
        if max_tile_bytes is not None:
            _same_rows_on_every_rank(rows, hidden.device, group)
        loss, metrics = _ShardedLinearPolicyLoss.apply(hidden, weight, bias, ids, mask, vocab_start, group, rows,
                                                       float(temperature), float(entropy_coef), need_h, need_w,
                                                       inputs, loss_args)
    return loss, {**_metrics(metrics, slots, ref_logp is not None), "entropy_mean": metrics[5]}


class _ShardedLinearPolicyLoss(torch.autograd.Function):
    """The loss path over this rank's shard: per chunk the ``[C]`` statistics are combined before the
    gradient epilogue, and ``d hidden``'s fp32 ``[C, H]`` partial sums after it; backward scales."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, mask, vocab_start, group, rows, temperature, entropy_coef, need_h,
                need_w, inputs, loss_args):
        from .kernels.from_hidden import loss_upstream
        from .kernels.linear_logprobs import run_chunks

        old_logp, adv, ref_logp, token_weights, token_scale, tok, seq = inputs
        B, T = mask.shape
        per_token = {k: loss_args[k] for k in ("objective", "dual_or_low", "delta_or_high", "params", "row_stat",
                                               "beta", "kl_kind", "kl_bias_correction", "max_log_ratio")}

        def token_grad(logp, old, a, ok, ref, w):  # the policy_loss op's d l / d logp (traced, unlike the raw launch)
            return ops().policy_loss(logp, old, a, ok, ref, w, None, None, **per_token, aggregation=0, max_tokens=1.0,
                                     num_tokens_value=-1.0, num_seqs_value=-1.0, dp_size=1, needs_grad=True)[2]

        upstream = None
        if need_h or need_w:
            upstream = loss_upstream(token_grad, T, old_logp, adv, ref_logp, token_weights, token_scale, entropy_coef)
        chunks = run_chunks(hidden, weight, bias, ids.reshape(-1), mask.reshape(-1), temperature, rows,
                            upstream=upstream, need_hidden=need_h, need_weight=need_w, vocab_start=vocab_start,
                            steps=_sharded_steps(group))
        loss, metrics, *_ = ops().policy_loss(chunks.logp.view(B, T), old_logp, adv, mask, ref_logp, token_weights, tok,
                                              seq, **loss_args, needs_grad=False, entropy=chunks.entropy.view(B, T),
                                              entropy_coef=entropy_coef)
        # d hidden rounded once now (its fp32 sums are done), d weight and d bias kept fp32 until scaled
        dh = chunks.d_hidden.to(hidden.dtype) if need_h else chunks.d_hidden
        ctx.save_for_backward(dh, chunks.d_weight, chunks.d_bias)
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _):
        scaled = [None if g.numel() == 0 or dtype is None else ops().scale_by_scalar(g, grad_loss, dtype)
                  for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*scaled, *[None] * 11)
