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
from . import from_hidden as _from_hidden
from . import from_logits as _from_logits
from . import kl as _kl
from . import linear_logprobs as _linear
from . import logits as _logits
from . import policy_loss as _policy_loss
from . import shaping as _shaping
from . import surrogate as _surrogate
from ._common import elementwise_grad, grad_buffer_dtype, scalar_scale

# --- elementwise backward --------------------------------------------------------------------------


@custom_op("rlloss::scale_by_stored_grad", mutates_args=())
def scale_by_stored_grad(g: Tensor, grad_out: Tensor, dtype: torch.dtype) -> Tensor:
    """``g * grad_out`` in ``dtype``: the backward of an elementwise op whose forward stored ``g``."""
    return elementwise_grad(g, grad_out, dtype)


@register_fake("rlloss::scale_by_stored_grad")
def _(g, grad_out, dtype):
    return g.new_empty(g.shape, dtype=dtype)


@custom_op("rlloss::scale_by_scalar", mutates_args=())
def scale_by_scalar(g: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``g * scale`` in ``dtype``, ``scale`` a one-element tensor (read on the device): the backward of
    an op whose forward formed its gradients for an upstream gradient of 1."""
    return scalar_scale(g, scale, dtype)


@register_fake("rlloss::scale_by_scalar")
def _(g, scale, dtype):
    return g.new_empty(g.shape, dtype=dtype)


# --- policy_loss -----------------------------------------------------------------------------------


@custom_op("rlloss::policy_loss", mutates_args=())
def policy_loss(
    logp: Tensor, old_logp: Tensor | None, adv: Tensor, mask: Tensor, ref_logp: Tensor | None,
    token_weights: Tensor | None, num_tokens: Tensor | None, num_seqs: Tensor | None,
    objective: int, dual_or_low: bool, delta_or_high: bool, params: list[float], row_stat: int,
    beta: float, kl_kind: int, kl_bias_correction: bool, max_log_ratio: float, aggregation: int,
    max_tokens: float, num_tokens_value: float, num_seqs_value: float, dp_size: int, needs_grad: bool,
    entropy: Tensor | None = None, entropy_coef: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, metrics[N_METRICS], g, factor[1], row_factor)``: see ``kernels.policy_loss.policy_loss_forward``
    (``entropy``: fp32 ``[B, T]`` whose ``entropy_coef`` multiple the loss subtracts, not differentiated here)."""
    return _policy_loss.policy_loss_forward(
        logp, old_logp, adv, mask, ref_logp, token_weights, num_tokens, num_seqs, objective=objective,
        dual_or_low=dual_or_low, delta_or_high=delta_or_high, params=params, row_stat=row_stat, beta=beta,
        kl_kind=kl_kind, kl_bias_correction=kl_bias_correction, max_log_ratio=max_log_ratio, aggregation=aggregation,
        max_tokens=max_tokens, num_tokens_value=num_tokens_value, num_seqs_value=num_seqs_value, dp_size=dp_size,
        needs_grad=needs_grad, entropy=entropy, entropy_coef=entropy_coef,
    )


@register_fake("rlloss::policy_loss")
def _(logp, old_logp, adv, mask, ref_logp, token_weights, num_tokens, num_seqs, objective, dual_or_low,
      delta_or_high, params, row_stat, beta, kl_kind, kl_bias_correction, max_log_ratio, aggregation, max_tokens,
      num_tokens_value, num_seqs_value, dp_size, needs_grad, entropy=None, entropy_coef=0.0):
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
    ctx.has_grad = inputs[22]  # needs_grad: g was written


def _policy_loss_grad(ctx, grad_loss, *_):
    g, factor, row_factor = ctx.saved_tensors
    grad = None
    if grad_loss is not None and ctx.has_grad:
        grad = torch.ops.rlloss.policy_loss_backward(g, grad_loss, factor, row_factor, ctx.logp_dtype)
    return (grad,) + (None,) * 24


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
# The whole call is one op on an unsharded head (opaque to the tracer: no recompile per token
# count); the per-tile ops serve a vocabulary-parallel head, whose collectives between the tiles'
# steps ``torch.compile`` traces (``rlloss._fused``).


@custom_op("rlloss::linear_tile_stats", mutates_args=())
def linear_tile_stats(tile: Tensor, bias: Tensor | None, ids: Tensor, ok: Tensor, temperature: float
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(m, s, u, zt)`` fp32 ``[C]`` of one logits tile (``linear_logprobs.tile_stats``)."""
    return _linear.tile_stats(tile, bias, ids, ok, temperature)


@linear_tile_stats.register_fake
def _(tile, bias, ids, ok, temperature):
    return tuple(tile.new_empty(tile.shape[0], dtype=torch.float32) for _ in range(4))


@custom_op("rlloss::linear_tile_grad_", mutates_args=("tile",))
def linear_tile_grad_(tile: Tensor, bias: Tensor | None, ids: Tensor, ok: Tensor, lse: Tensor, entropy: Tensor,
                      g_logp: Tensor, g_entropy: Tensor | None, temperature: float, dtype: torch.dtype) -> None:
    """``d logits`` written over the tile in ``dtype`` (``linear_logprobs.tile_grad_``; ``grad_view`` reads it)."""
    _linear.tile_grad_(tile, bias, ids, ok, lse, entropy, g_logp, g_entropy, temperature, dtype)


@linear_tile_grad_.register_fake
def _(tile, bias, ids, ok, lse, entropy, g_logp, g_entropy, temperature, dtype):
    return None


def _fp32_grads(chunks, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``run_chunks``' gradients in their inputs' dtypes; distinct empty tensors for those not formed."""
    dh, dw, db = chunks.d_hidden, chunks.d_weight, chunks.d_bias
    return (dh.to(hidden.dtype) if dh.numel() else weight.new_empty(0),
            dw.to(weight.dtype) if dw.numel() else weight.new_empty(0),
            db.to(bias.dtype) if bias is not None and db.numel() else weight.new_empty(0))


@custom_op("rlloss::linear_logprobs", mutates_args=())
def linear_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, valid: Tensor,
                    temperature: float, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` fp32 ``[N]`` of an unsharded head (0 where not ``valid``), tiles of ``rows``
    tokens; ``hidden`` ``[N, H]`` or ``[B, T, H]``, ``ids`` and ``valid`` ``[N]``. Backward recomputes
    the tiles (``linear_logprobs_backward``)."""
    chunks = _linear.run_chunks(hidden, weight, bias, ids, valid, temperature, rows)
    return chunks.logp, chunks.entropy, chunks.lse


@linear_logprobs.register_fake
def _(hidden, weight, bias, ids, valid, temperature, rows):
    return tuple(hidden.new_empty(ids.shape[0], dtype=torch.float32) for _ in range(3))


@custom_op("rlloss::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, valid: Tensor,
                             lse: Tensor, entropy: Tensor, g_logp: Tensor, g_entropy: Tensor | None,
                             temperature: float, rows: int, need_hidden: bool, need_weight: bool
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """``(d hidden, d weight, d bias)`` in the inputs' dtypes (an empty tensor for each not needed), the
    tiles recomputed; ``g_entropy`` None: the entropy carries no gradient."""
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)

    def upstream(idx, ok, logp, ent):
        g_e = None if g_entropy is None else torch.where(ok, g_entropy.index_select(0, idx).float(), zero)
        return torch.where(ok, g_logp.index_select(0, idx).float(), zero), g_e

    chunks = _linear.run_chunks(hidden, weight, bias, ids, valid, temperature, rows, upstream=upstream,
                                known=(lse, entropy), need_hidden=need_hidden, need_weight=need_weight)
    return _fp32_grads(chunks, hidden, weight, bias)


def _grads_fake(hidden, weight, bias, need_hidden, need_weight):
    dh = hidden.new_empty(hidden.shape) if need_hidden else weight.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else weight.new_empty(0)
    db = torch.empty_like(bias) if bias is not None and need_weight else weight.new_empty(0)
    return dh, dw, db


@linear_logprobs_backward.register_fake
def _(hidden, weight, bias, ids, valid, lse, entropy, g_logp, g_entropy, temperature, rows, need_hidden,
      need_weight):
    return _grads_fake(hidden, weight, bias, need_hidden, need_weight)


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, ids, valid, temperature, rows = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, ids, valid, entropy, lse)
    ctx.temperature, ctx.rows = temperature, rows
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # an entropy nobody differentiates arrives as None: no work for it


def _linear_grad(ctx, g_logp, g_entropy, _):
    hidden, weight, bias, ids, valid, entropy, lse = ctx.saved_tensors
    if g_logp is None:
        g_logp = torch.zeros_like(lse)
    # a frozen head (LoRA) or frozen hidden states: that gradient, and its matmul, skipped
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dh, dw, db = linear_logprobs_backward(hidden, weight, bias, ids, valid, lse, entropy, g_logp, g_entropy,
                                          ctx.temperature, ctx.rows, need_h, need_w)
    # a frozen weight with a trainable bias: d bias comes with the d weight product, which is dropped
    return (dh if need_h else None, dw if ctx.needs_input_grad[1] else None,
            db if ctx.needs_input_grad[2] else None, None, None, None, None)


register_autograd("rlloss::linear_logprobs", _linear_grad, setup_context=_linear_setup)


@custom_op("rlloss::linear_policy_loss", mutates_args=())
def linear_policy_loss(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, mask: Tensor, old_logp: Tensor | None,
    adv: Tensor, ref_logp: Tensor | None, token_weights: Tensor | None, token_scale: Tensor,
    num_tokens: Tensor | None, num_seqs: Tensor | None, temperature: float, entropy_coef: float, rows: int,
    need_hidden: bool, need_weight: bool, objective: int, dual_or_low: bool, delta_or_high: bool, params: list[float],
    row_stat: int, beta: float, kl_kind: int, kl_bias_correction: bool, max_log_ratio: float, aggregation: int,
    max_tokens: float, num_tokens_value: float, num_seqs_value: float, dp_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, metrics, d hidden, d weight, d bias)`` of ``policy_loss_from_hidden``'s loss path
    (``from_hidden``): the gradients for an upstream gradient of 1, formed in this forward, ``d hidden``
    in hidden's dtype, ``d weight`` and ``d bias`` fp32 (an empty tensor for each not needed)."""
    loss, metrics, chunks = _from_hidden.policy_loss_from_hidden_forward(
        hidden, weight, bias, ids, mask, old_logp, adv, ref_logp, token_weights, token_scale, num_tokens, num_seqs,
        temperature=temperature, entropy_coef=entropy_coef, rows=rows, need_hidden=need_hidden,
        need_weight=need_weight, objective=objective, dual_or_low=dual_or_low, delta_or_high=delta_or_high,
        params=params, row_stat=row_stat, beta=beta, kl_kind=kl_kind, kl_bias_correction=kl_bias_correction,
        max_log_ratio=max_log_ratio, aggregation=aggregation, max_tokens=max_tokens,
        num_tokens_value=num_tokens_value, num_seqs_value=num_seqs_value, dp_size=dp_size)
    empty = [weight.new_empty(0) for _ in range(3)]
    return (loss, metrics, *(g if g.numel() else e for g, e in zip(chunks[3:], empty)))


@linear_policy_loss.register_fake
def _(hidden, weight, bias, ids, mask, old_logp, adv, ref_logp, token_weights, token_scale, num_tokens, num_seqs,
      temperature, entropy_coef, rows, need_hidden, need_weight, *args):
    f32 = torch.float32
    dh = hidden.new_empty(hidden.shape) if need_hidden else weight.new_empty(0)
    dw = weight.new_empty(weight.shape, dtype=f32) if need_weight else weight.new_empty(0)
    db = weight.new_empty(bias.shape, dtype=f32) if bias is not None and need_weight else weight.new_empty(0)
    return hidden.new_empty((), dtype=f32), hidden.new_empty(_policy_loss.N_METRICS, dtype=f32), dh, dw, db


def _linear_loss_setup(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    _, metrics, dh, dw, db = output
    ctx.mark_non_differentiable(metrics, dh, dw, db)
    ctx.save_for_backward(dh, dw, db)
    ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype


def _linear_loss_grad(ctx, grad_loss, *_):
    dh, dw, db = ctx.saved_tensors
    h_dtype, w_dtype, b_dtype = ctx.dtypes
    scaled = [None if g.numel() == 0 or dtype is None else scale_by_scalar(g, grad_loss, dtype)
              for g, dtype in ((dh, h_dtype), (dw, w_dtype), (db, b_dtype))]
    return (*scaled, *[None] * 28)


register_autograd("rlloss::linear_policy_loss", _linear_loss_grad, setup_context=_linear_loss_setup)
