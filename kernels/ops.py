"""Every Triton entry point as a ``torch.library`` custom op in the ``rlloss`` namespace.

The kernel modules hold the ``@triton.jit`` functions and their launch logic as plain functions of
tensors and numbers; this module registers each as ``torch.ops.rlloss.<name>`` with a fake
implementation (shapes and dtypes only, for ``torch.compile`` and other tracers) and, where a
gradient flows, ``register_autograd`` whose backward calls another op of this module, never a raw
launch. So the tracer sees one opaque node per launch group and ``torch.compile(fullgraph=True)``
goes through; launch arithmetic (block sizes, grids) happens inside the op body, on real ints.

Signatures follow the custom-op rules: tensors, optional tensors, int, float, bool, dtype and lists
of numbers; no objectives or ``int | Tensor`` unions (the dispatch layer, ``rlloss._fused``, turns
them into codes); outputs are tensors (an absent one is an empty tensor), never aliases of inputs;
saved buffers and metrics are outputs marked non-differentiable. The in-place backward of
``token_logprobs`` declares that it mutates ``logits``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op, register_autograd, register_fake

from . import advantages as _advantages
from . import aggregation as _aggregation
from . import from_logits as _from_logits
from . import kl as _kl
from . import linear_logprobs as _linear
from . import logits as _logits
from . import policy_loss as _policy_loss
from . import shaping as _shaping
from . import surrogate as _surrogate
from ._common import elementwise_grad, grad_buffer_dtype

# --- elementwise backward --------------------------------------------------------------------------


@custom_op("rlloss::scale_by_stored_grad", mutates_args=())
def scale_by_stored_grad(g: Tensor, grad_out: Tensor, dtype: torch.dtype) -> Tensor:
    """``g * grad_out`` in ``dtype``: the backward of an elementwise op whose forward stored ``g``."""
    return elementwise_grad(g, grad_out, dtype)


@register_fake("rlloss::scale_by_stored_grad")
def _(g, grad_out, dtype):
    return g.new_empty(g.shape, dtype=dtype)


# --- policy_loss -----------------------------------------------------------------------------------


@custom_op("rlloss::policy_loss", mutates_args=())
def policy_loss(
    logp: Tensor, old_logp: Tensor | None, adv: Tensor, mask: Tensor, ref_logp: Tensor | None,
    token_weights: Tensor | None, num_tokens: Tensor | None, num_seqs: Tensor | None,
    objective: int, dual_or_low: bool, delta_or_high: bool, params: list[float], row_stat: int,
    beta: float, kl_kind: int, kl_bias_correction: bool, max_log_ratio: float, aggregation: int,
    max_tokens: float, num_tokens_value: float, num_seqs_value: float, dp_size: int, needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, metrics[N_METRICS], g, factor[1], row_factor)``: see ``kernels.policy_loss.policy_loss_forward``."""
    return _policy_loss.policy_loss_forward(
        logp, old_logp, adv, mask, ref_logp, token_weights, num_tokens, num_seqs, objective=objective,
        dual_or_low=dual_or_low, delta_or_high=delta_or_high, params=params, row_stat=row_stat, beta=beta,
        kl_kind=kl_kind, kl_bias_correction=kl_bias_correction, max_log_ratio=max_log_ratio, aggregation=aggregation,
        max_tokens=max_tokens, num_tokens_value=num_tokens_value, num_seqs_value=num_seqs_value, dp_size=dp_size,
        needs_grad=needs_grad,
    )


@register_fake("rlloss::policy_loss")
def _(logp, old_logp, adv, mask, ref_logp, token_weights, num_tokens, num_seqs, objective, dual_or_low,
      delta_or_high, params, row_stat, beta, kl_kind, kl_bias_correction, max_log_ratio, aggregation, max_tokens,
      num_tokens_value, num_seqs_value, dp_size, needs_grad):
    B = logp.shape[0]
    f32 = torch.float32
    g = logp.new_empty(logp.shape if needs_grad else (0,), dtype=grad_buffer_dtype(logp.dtype))
    return (logp.new_empty((), dtype=f32), logp.new_empty(_policy_loss.N_METRICS, dtype=f32), g, logp.new_empty(1, dtype=f32),
            logp.new_empty(max(B, 1), dtype=f32))


@custom_op("rlloss::policy_loss_backward", mutates_args=())
def policy_loss_backward(g: Tensor, grad_loss: Tensor, factor: Tensor, row_factor: Tensor,
                         dtype: torch.dtype) -> Tensor:
    """``grad_loss * factor * row_factor[i] * g[i, t]`` in ``dtype``."""
    return _policy_loss.scale_grad(g, grad_loss, factor, row_factor, dtype)


@register_fake("rlloss::policy_loss_backward")
def _(g, grad_loss, factor, row_factor, dtype):
    return g.new_empty(g.shape, dtype=dtype)


def _policy_loss_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # metrics and buffers get no gradient: no zero tensors for them
    _, metrics, g, factor, row_factor = output
    ctx.mark_non_differentiable(metrics, g, factor, row_factor)
    ctx.save_for_backward(g, factor, row_factor)
    ctx.logp_dtype = inputs[0].dtype
    ctx.has_grad = inputs[-1]  # needs_grad: g was written


def _policy_loss_grad(ctx, grad_loss, *_):
    g, factor, row_factor = ctx.saved_tensors
    grad = None
    if grad_loss is not None and ctx.has_grad:
        grad = torch.ops.rlloss.policy_loss_backward(g, grad_loss, factor, row_factor, ctx.logp_dtype)
    return (grad,) + (None,) * 22


register_autograd("rlloss::policy_loss", _policy_loss_grad, setup_context=_policy_loss_setup)


# --- per-token objective loss ----------------------------------------------------------------------


@custom_op("rlloss::objective_surrogate", mutates_args=())
def objective_surrogate(
    logp: Tensor, old_logp: Tensor | None, adv: Tensor, mask: Tensor, objective: int, dual_or_low: bool,
    delta_or_high: bool, params: list[float], row_stat: int, max_log_ratio: float, needs_grad: bool,
) -> tuple[Tensor, Tensor]:
    """``(per-token loss [B, T] fp32, g)``: see ``kernels.surrogate.objective_surrogate_forward``."""
    return _surrogate.objective_surrogate_forward(
        logp, old_logp, adv, mask, objective=objective, dual_or_low=dual_or_low, delta_or_high=delta_or_high,
        params=params, row_stat=row_stat, max_log_ratio=max_log_ratio, needs_grad=needs_grad,
    )


@register_fake("rlloss::objective_surrogate")
def _(logp, old_logp, adv, mask, objective, dual_or_low, delta_or_high, params, row_stat, max_log_ratio, needs_grad):
    g = logp.new_empty(logp.shape if needs_grad else (0,), dtype=grad_buffer_dtype(logp.dtype))
    return logp.new_empty(logp.shape, dtype=torch.float32), g


def _stored_grad_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    _, g = output
    ctx.mark_non_differentiable(g)
    ctx.save_for_backward(g)
    ctx.logp_dtype = inputs[0].dtype
    ctx.has_grad = inputs[-1]  # needs_grad: g was written


def _stored_grad(n_inputs: int):
    def backward(ctx, grad_out, _):
        (g,) = ctx.saved_tensors
        grad = None
        if grad_out is not None and ctx.has_grad:
            grad = torch.ops.rlloss.scale_by_stored_grad(g, grad_out, ctx.logp_dtype)
        return (grad,) + (None,) * (n_inputs - 1)

    return backward


register_autograd("rlloss::objective_surrogate", _stored_grad(11), setup_context=_stored_grad_setup)


# --- KL estimators ---------------------------------------------------------------------------------


@custom_op("rlloss::kl_estimate", mutates_args=())
def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: int, needs_grad: bool) -> tuple[Tensor, Tensor]:
    """``(estimate fp32, g)``: see ``kernels.kl.kl_forward``."""
    return _kl.kl_forward(logp, ref_logp, kind, needs_grad)


@register_fake("rlloss::kl_estimate")
def _(logp, ref_logp, kind, needs_grad):
    g = logp.new_empty(logp.shape if needs_grad else (0,), dtype=grad_buffer_dtype(logp.dtype))
    return logp.new_empty(logp.shape, dtype=torch.float32), g


register_autograd("rlloss::kl_estimate", _stored_grad(4), setup_context=_stored_grad_setup)


# --- masked_mean -----------------------------------------------------------------------------------


@custom_op("rlloss::masked_mean", mutates_args=())
def masked_mean(x: Tensor, mask: Tensor, dim: int | None, normalizer: Tensor | None,
                normalizer_value: float) -> tuple[Tensor, Tensor]:
    """``(mean, den)``: see ``kernels.aggregation.masked_mean_forward``."""
    return _aggregation.masked_mean_forward(x, mask, dim, normalizer, normalizer_value)


@register_fake("rlloss::masked_mean")
def _(x, mask, dim, normalizer, normalizer_value):
    shape = _aggregation.reduced_shape(x.shape, dim)
    rows = 1
    for size in shape:
        rows *= size
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(max(rows, 1), dtype=torch.float32)


@custom_op("rlloss::masked_mean_backward", mutates_args=())
def masked_mean_backward(grad_out: Tensor, mask: Tensor, den: Tensor, dim: int | None, dtype: torch.dtype) -> Tensor:
    """d mean / d x, shaped as ``mask``: see ``kernels.aggregation.masked_mean_backward``."""
    return _aggregation.masked_mean_backward(grad_out, mask, den, dim, dtype)


@register_fake("rlloss::masked_mean_backward")
def _(grad_out, mask, den, dim, dtype):
    return mask.new_empty(mask.shape, dtype=dtype)


def _masked_mean_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    x, mask, dim = inputs[:3]
    _, den = output
    ctx.mark_non_differentiable(den)
    ctx.save_for_backward(mask, den)
    ctx.meta = (dim, x.dtype)


def _masked_mean_grad(ctx, grad_out, _):
    mask, den = ctx.saved_tensors
    dim, dtype = ctx.meta
    grad = None if grad_out is None else torch.ops.rlloss.masked_mean_backward(grad_out, mask, den, dim, dtype)
    return grad, None, None, None, None


register_autograd("rlloss::masked_mean", _masked_mean_grad, setup_context=_masked_mean_setup)


# --- group advantages ------------------------------------------------------------------------------


@custom_op("rlloss::group_advantages", mutates_args=())
def group_advantages(rewards: Tensor, group_ids: Tensor | None, group_size: int, loo: bool, scale: int, eps: float,
                     keep_single: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(adv [N] fp32, stats [4, K], batch [2])``: see ``kernels.advantages.group_advantages_forward``."""
    return _advantages.group_advantages_forward(rewards, group_ids, group_size, loo, scale, eps, keep_single)


@register_fake("rlloss::group_advantages")
def _(rewards, group_ids, group_size, loo, scale, eps, keep_single):
    n = rewards.shape[0]
    if group_ids is None:
        k = n // group_size
    else:  # the number of distinct ids: known only from the values
        k = torch.library.get_ctx().new_dynamic_size()
    f32 = torch.float32
    return rewards.new_empty(n, dtype=f32), rewards.new_empty((4, k), dtype=f32), rewards.new_empty(2, dtype=f32)


@custom_op("rlloss::group_advantages_backward", mutates_args=())
def group_advantages_backward(dadv: Tensor, rewards: Tensor, group_ids: Tensor | None, group_size: int, adv: Tensor,
                              stats: Tensor, batch: Tensor, loo: bool, scale: int, eps: float,
                              keep_single: bool) -> Tensor:
    """d loss / d rewards: see ``kernels.advantages.group_advantages_backward``."""
    return _advantages.group_advantages_backward(dadv, rewards, group_ids, group_size, adv, stats, batch, loo, scale,
                                                 eps, keep_single)


@register_fake("rlloss::group_advantages_backward")
def _(dadv, rewards, group_ids, group_size, adv, stats, batch, loo, scale, eps, keep_single):
    return rewards.new_empty(rewards.shape)


def _group_advantages_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    rewards, group_ids, group_size, loo, scale, eps, keep_single = inputs
    adv, stats, batch = output
    ctx.mark_non_differentiable(stats, batch)
    ctx.save_for_backward(rewards, group_ids, adv, stats, batch)
    ctx.meta = (group_size, loo, scale, eps, keep_single)


def _group_advantages_grad(ctx, dadv, *_):
    rewards, group_ids, adv, stats, batch = ctx.saved_tensors
    group_size, loo, scale, eps, keep_single = ctx.meta
    if dadv is None:
        return (None,) * 7
    grad = torch.ops.rlloss.group_advantages_backward(dadv, rewards, group_ids, group_size, adv, stats, batch, loo,
                                                      scale, eps, keep_single)
    return (grad,) + (None,) * 6


register_autograd("rlloss::group_advantages", _group_advantages_grad, setup_context=_group_advantages_setup)


# --- DAPO shaping (no gradient: a bool output, and penalties that are constants of the lengths) ----


@custom_op("rlloss::dynamic_sampling_mask", mutates_args=())
def dynamic_sampling_mask(rewards: Tensor, group_ids: Tensor | None, group_size: int) -> Tensor:
    """bool ``[N]``: see ``kernels.shaping.dynamic_sampling_mask_triton``."""
    return _shaping.dynamic_sampling_mask_triton(rewards, group_size if group_ids is None else group_ids)


@register_fake("rlloss::dynamic_sampling_mask")
def _(rewards, group_ids, group_size):
    return rewards.new_empty(rewards.shape, dtype=torch.bool)


@custom_op("rlloss::soft_overlong_penalty", mutates_args=())
def soft_overlong_penalty(lengths: Tensor, max_len: float, cache_len: float, factor: float) -> Tensor:
    """fp32 ``[N]``: see ``kernels.shaping.soft_overlong_penalty_triton``."""
    return _shaping.soft_overlong_penalty_triton(lengths, max_len, cache_len, factor)


@register_fake("rlloss::soft_overlong_penalty")
def _(lengths, max_len, cache_len, factor):
    return lengths.new_empty(lengths.shape, dtype=torch.float32)


# --- token log-probs and entropy from logits -------------------------------------------------------


@custom_op("rlloss::token_logprobs", mutates_args=())
def token_logprobs(logits: Tensor, ids: Tensor, temperature: float, return_entropy: bool,
                   inplace_backward: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` fp32 ``[B, T]`` (entropy empty without ``return_entropy``).

    ``inplace_backward`` is read by the registered backward only (it writes the gradient into the
    logits buffer through ``token_logprobs_backward_``).
    """
    return _logits.token_logprobs_forward(logits, ids, temperature, return_entropy)


@register_fake("rlloss::token_logprobs")
def _(logits, ids, temperature, return_entropy, inplace_backward):
    B, T, _ = logits.shape
    f32 = torch.float32
    return (logits.new_empty((B, T), dtype=f32), logits.new_empty((B, T) if return_entropy else (0,), dtype=f32),
            logits.new_empty((B, T), dtype=f32))


@custom_op("rlloss::token_logprobs_backward", mutates_args=())
def token_logprobs_backward(logits: Tensor, ids: Tensor, lse: Tensor, entropy: Tensor, g_logp: Tensor | None,
                            g_entropy: Tensor | None, temperature: float) -> Tensor:
    """d / d logits, a new ``[B, T, V]`` tensor in the logits' dtype."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _logits.token_logprobs_backward(logits, ids, lse, entropy, g_logp, g_entropy, temperature, grad)
    return grad


@register_fake("rlloss::token_logprobs_backward")
def _(logits, ids, lse, entropy, g_logp, g_entropy, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@custom_op("rlloss::token_logprobs_backward_", mutates_args=("logits",))
def token_logprobs_backward_(logits: Tensor, ids: Tensor, lse: Tensor, entropy: Tensor, g_logp: Tensor | None,
                             g_entropy: Tensor | None, temperature: float) -> None:
    """d / d logits written over ``logits`` (which must have a unit vocabulary stride)."""
    _logits.token_logprobs_backward(logits, ids, lse, entropy, g_logp, g_entropy, temperature, logits)


@register_fake("rlloss::token_logprobs_backward_")
def _(logits, ids, lse, entropy, g_logp, g_entropy, temperature):
    return None


def _token_logprobs_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused entropy output costs nothing in backward
    logits, ids, temperature, return_entropy, inplace_backward = inputs
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, ids, lse, entropy)
    # in place only where the buffer is the kernel's own layout, and never while tracing for compile
    # (a gradient that aliases a saved input cannot be functionalised)
    ctx.inplace = inplace_backward and logits.stride(2) == 1 and not torch.compiler.is_compiling()
    ctx.temperature = temperature


def _token_logprobs_grad(ctx, g_logp, g_entropy, _):
    logits, ids, lse, entropy = ctx.saved_tensors
    if entropy.numel() == 0:
        g_entropy = None
    if ctx.inplace:
        torch.ops.rlloss.token_logprobs_backward_(logits, ids, lse, entropy, g_logp, g_entropy, ctx.temperature)
        grad = logits
    else:
        grad = torch.ops.rlloss.token_logprobs_backward(logits, ids, lse, entropy, g_logp, g_entropy,
                                                       ctx.temperature)
    return grad, None, None, None, None


register_autograd("rlloss::token_logprobs", _token_logprobs_grad, setup_context=_token_logprobs_setup)


# --- policy_loss_from_logits: the loss straight from logits (4 launches forward + backward) --------


@custom_op("rlloss::policy_loss_from_logits", mutates_args=())
def policy_loss_from_logits(
    logits: Tensor, ids: Tensor, mask: Tensor, old_logp: Tensor | None, adv: Tensor, ref_logp: Tensor | None,
    token_weights: Tensor | None, num_tokens: Tensor | None, num_seqs: Tensor | None, temperature: float,
    entropy_coef: float, inplace_backward: bool, objective: int, dual_or_low: bool, delta_or_high: bool,
    params: list[float], row_stat: int, beta: float, kl_kind: int, kl_bias_correction: bool, max_log_ratio: float,
    aggregation: int, max_tokens: float, num_tokens_value: float, num_seqs_value: float, dp_size: int,
    needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, metrics, lse, entropy, g, factor, row_factor)``: see ``kernels.from_logits``.

    ``inplace_backward`` is read by the registered backward only.
    """
    return _from_logits.policy_loss_from_logits_forward(
        logits, ids, mask, old_logp, adv, ref_logp, token_weights, num_tokens, num_seqs, temperature=temperature,
        entropy_coef=entropy_coef, needs_grad=needs_grad, objective=objective, dual_or_low=dual_or_low,
        delta_or_high=delta_or_high, params=params, row_stat=row_stat, beta=beta, kl_kind=kl_kind,
        kl_bias_correction=kl_bias_correction, max_log_ratio=max_log_ratio, aggregation=aggregation,
        max_tokens=max_tokens, num_tokens_value=num_tokens_value, num_seqs_value=num_seqs_value, dp_size=dp_size,
    )


@register_fake("rlloss::policy_loss_from_logits")
def _(logits, ids, mask, old_logp, adv, ref_logp, token_weights, num_tokens, num_seqs, temperature, entropy_coef,
      inplace_backward, objective, dual_or_low, delta_or_high, params, row_stat, beta, kl_kind, kl_bias_correction,
      max_log_ratio, aggregation, max_tokens, num_tokens_value, num_seqs_value, dp_size, needs_grad):
    B, T, _ = logits.shape
    f32 = torch.float32
    g = logits.new_empty((B, T) if needs_grad else (0,), dtype=f32)
    return (logits.new_empty((), dtype=f32), logits.new_empty(_policy_loss.N_METRICS, dtype=f32),
            logits.new_empty((B, T), dtype=f32), logits.new_empty((B, T), dtype=f32), g,
            logits.new_empty(1, dtype=f32), logits.new_empty(max(B, 1), dtype=f32))


@custom_op("rlloss::policy_loss_from_logits_backward", mutates_args=())
def policy_loss_from_logits_backward(logits: Tensor, ids: Tensor, mask: Tensor, lse: Tensor, entropy: Tensor,
                                     g: Tensor, grad_loss: Tensor, factor: Tensor, row_factor: Tensor,
                                     temperature: float, entropy_coef: float) -> Tensor:
    """d loss / d logits, a new ``[B, T, V]`` tensor in the logits' dtype."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _logits.policy_loss_from_logits_backward(logits, ids, mask, lse, entropy, g, grad_loss, factor, row_factor,
                                             temperature, entropy_coef, grad)
    return grad


@register_fake("rlloss::policy_loss_from_logits_backward")
def _(logits, ids, mask, lse, entropy, g, grad_loss, factor, row_factor, temperature, entropy_coef):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@custom_op("rlloss::policy_loss_from_logits_backward_", mutates_args=("logits",))
def policy_loss_from_logits_backward_(logits: Tensor, ids: Tensor, mask: Tensor, lse: Tensor, entropy: Tensor,
                                      g: Tensor, grad_loss: Tensor, factor: Tensor, row_factor: Tensor,
                                      temperature: float, entropy_coef: float) -> None:
    """d loss / d logits written over ``logits`` (which must have a unit vocabulary stride)."""
    _logits.policy_loss_from_logits_backward(logits, ids, mask, lse, entropy, g, grad_loss, factor, row_factor,
                                             temperature, entropy_coef, logits)


@register_fake("rlloss::policy_loss_from_logits_backward_")
def _(logits, ids, mask, lse, entropy, g, grad_loss, factor, row_factor, temperature, entropy_coef):
    return None


def _from_logits_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    logits, ids, mask = inputs[:3]
    _, metrics, lse, entropy, g, factor, row_factor = output
    ctx.mark_non_differentiable(metrics, lse, entropy, g, factor, row_factor)
    ctx.save_for_backward(logits, ids, mask, lse, entropy, g, factor, row_factor)
    ctx.temperature, ctx.entropy_coef, ctx.has_grad = inputs[9], inputs[10], inputs[-1]
    ctx.inplace = inputs[11] and logits.stride(2) == 1 and not torch.compiler.is_compiling()


def _from_logits_grad(ctx, grad_loss, *_):
    n_inputs = 27
    if grad_loss is None or not ctx.has_grad:
        return (None,) * n_inputs
    logits, ids, mask, lse, entropy, g, factor, row_factor = ctx.saved_tensors
    args = (ids, mask, lse, entropy, g, grad_loss, factor, row_factor, ctx.temperature, ctx.entropy_coef)
    if ctx.inplace:
        torch.ops.rlloss.policy_loss_from_logits_backward_(logits, *args)
        grad = logits
    else:
        grad = torch.ops.rlloss.policy_loss_from_logits_backward(logits, *args)
    return (grad,) + (None,) * (n_inputs - 1)


register_autograd("rlloss::policy_loss_from_logits", _from_logits_grad, setup_context=_from_logits_setup)


# --- the loss from hidden states: rlloss::linear_* -------------------------------------------------


@custom_op("rlloss::linear_stats", mutates_args=())
def linear_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, valid: Tensor,
                 vocab_start: Tensor, temperature: float, hidden_grad: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token ``(m, s, u, zt, acc, sx)`` over one weight shard (see ``linear_logprobs.linear_stats``)."""
    return _linear.linear_stats(hidden, weight, bias, ids, valid, vocab_start, temperature, hidden_grad)


@linear_stats.register_fake
def _(hidden, weight, bias, ids, valid, vocab_start, temperature, hidden_grad=False):
    n = hidden.shape[0]
    acc = hidden.new_empty(hidden.shape if hidden_grad else (0,), dtype=torch.float32)
    sx = hidden.new_empty(n if hidden_grad else 0, dtype=torch.float32)
    return (*(hidden.new_empty(n, dtype=torch.float32) for _ in range(4)), acc, sx)


@custom_op("rlloss::linear_finish_logp_hidden_grad_", mutates_args=("acc",))
def linear_finish_logp_hidden_grad_(acc: Tensor, weight: Tensor, ids: Tensor, vocab_start: Tensor, coef: Tensor,
                                    one_minus_p: Tensor, temperature: float) -> None:
    """In place, ``acc`` from ``linear_stats`` becomes this shard's part of ``d logp / d hidden`` (see
    ``linear_logprobs.finish_logp_hidden_grad``)."""
    _linear.finish_logp_hidden_grad(acc, weight, ids, vocab_start, coef, one_minus_p, temperature)


@linear_finish_logp_hidden_grad_.register_fake
def _(acc, weight, ids, vocab_start, coef, one_minus_p, temperature):
    return None


@custom_op("rlloss::linear_grads", mutates_args=())
def linear_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, valid: Tensor, vocab_start: Tensor,
                 m: Tensor, log_s: Tensor, entropy: Tensor, g_logp: Tensor, g_entropy: Tensor | None,
                 temperature: float, hidden_grad_fp32: bool = False, dlogp_dh: Tensor | None = None,
                 hidden_needed: bool = True, weight_needed: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(d hidden, d weight, d bias)``; an empty tensor for each not needed (``d bias`` without a bias);
    ``d hidden`` fp32 with ``hidden_grad_fp32``; ``dlogp_dh`` the forward's ``d logp / d hidden`` or None."""
    dh, dw, db = _linear.linear_grads(hidden, weight, bias, ids, valid, vocab_start, m, log_s, entropy, g_logp,
                                      g_entropy, temperature, hidden_grad_fp32, dlogp_dh, hidden_needed, weight_needed)
    return tuple(weight.new_empty(0) if g is None else g for g in (dh, dw, db))  # distinct empties: no aliasing


@linear_grads.register_fake
def _(hidden, weight, bias, ids, valid, vocab_start, m, log_s, entropy, g_logp, g_entropy, temperature,
      hidden_grad_fp32=False, dlogp_dh=None, hidden_needed=True, weight_needed=True):
    dh = hidden.new_empty(hidden.shape, dtype=torch.float32 if hidden_grad_fp32 else hidden.dtype) if hidden_needed \
        else weight.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_needed else weight.new_empty(0)
    db = torch.empty_like(bias) if bias is not None and weight_needed else weight.new_empty(0)
    return dh, dw, db


@custom_op("rlloss::linear_token_logprobs", mutates_args=())
def linear_token_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, valid: Tensor,
                          temperature: float, hidden_grad: bool = False
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(logp, entropy, m, log_s, dlogp_dh)`` of an unsharded LM head: fp32 ``[N]`` (``lse = m + log_s``),
    0 where not ``valid``; ``dlogp_dh`` fp32 ``[N, H]`` with ``hidden_grad`` (else ``[0]``), which
    backward scales by the log-prob's gradient instead of recomputing the logits for ``d hidden``."""
    start = torch.zeros(1, dtype=torch.int64, device=hidden.device)
    m, s, u, zt, dlogp_dh, sx = _linear.linear_stats(hidden, weight, bias, ids, valid, start, temperature, hidden_grad)
    logp, entropy, log_s = _linear.finish_stats(m, s, u, zt)
    if hidden_grad:  # one shard: M = m, S = s (0 where not valid, where s is 1 and sx 0)
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        _linear.finish_logp_hidden_grad(dlogp_dh, weight, ids, start, torch.where(valid, -1.0 / s, zero), sx / s,
                                        temperature)
    return logp, entropy, m, log_s, dlogp_dh


@linear_token_logprobs.register_fake
def _(hidden, weight, bias, ids, valid, temperature, hidden_grad=False):
    n = hidden.shape[0]
    dlogp_dh = hidden.new_empty(hidden.shape if hidden_grad else (0,), dtype=torch.float32)
    return (*(hidden.new_empty(n, dtype=torch.float32) for _ in range(4)), dlogp_dh)


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, ids, valid, temperature, *flag = inputs
    _, entropy, m, log_s, dlogp_dh = output
    ctx.save_for_backward(hidden, weight, bias, ids, valid, entropy, m, log_s, dlogp_dh)
    ctx.temperature = temperature
    ctx.hidden_grad = bool(flag and flag[0])
    ctx.mark_non_differentiable(m, log_s, dlogp_dh)
    if ctx.hidden_grad:  # the forward formed d logp / d hidden on the promise that the entropy carries nothing
        ctx.mark_non_differentiable(entropy)
    ctx.set_materialize_grads(False)  # an entropy nobody differentiates arrives as None: no work for it


def _linear_grad(ctx, g_logp, g_entropy, g_m, g_log_s, g_dlogp_dh):
    hidden, weight, bias, ids, valid, entropy, m, log_s, dlogp_dh = ctx.saved_tensors
    if g_logp is None:
        g_logp = torch.zeros_like(m)
    if ctx.hidden_grad:  # a non-differentiable entropy: whatever arrives for it (zeros, when compiled) is not used
        g_entropy = None
    start = torch.zeros(1, dtype=torch.int64, device=hidden.device)
    # a frozen head (LoRA) or frozen hidden states: that gradient, and the recompute it needs, skipped
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dh, dw, db = linear_grads(hidden, weight, bias, ids, valid, start, m, log_s, entropy, g_logp, g_entropy,
                              ctx.temperature, False, dlogp_dh if ctx.hidden_grad else None, need_h, need_w)
    # a frozen weight with a trainable bias: d bias needs the d weight kernel, whose d weight is dropped
    return (dh if need_h else None, dw if ctx.needs_input_grad[1] else None,
            db if ctx.needs_input_grad[2] else None, None, None, None, None)


register_autograd("rlloss::linear_token_logprobs", _linear_grad, setup_context=_linear_setup)
