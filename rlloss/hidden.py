"""The loss from hidden states and the LM head: token log-probs, entropy and ``policy_loss``, no logits.

At a vocabulary of 152k and 64k completion tokens the logits alone are 20 GB in bf16; every
function here takes the final hidden states and the LM head's weight instead. The reference
materialises the logits (it is the readable spec); the Triton backend never does
(``kernels/linear_logprobs.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from ._dispatch import resolve_backend
from ._validate import (
    warn_if_empty,
    check_float,
    check_ids_in_vocab,
    check_mask,
    check_number,
    check_same_device,
    check_tensor,
    compute_dtype,
)
from .aggregation import _token_scale
from .logits import _check_option_names, _checked_loss_options, _token_logprobs_torch, _with_entropy_bonus
from .loss import EMPTY_STEP, PolicyLoss, policy_loss

# --- validation ------------------------------------------------------------------------------------


def _check_hidden_inputs(hidden: object, weight: object, ids: object, bias: object, mask: object) -> torch.Tensor:
    """Shapes, dtypes and devices of the LM-head inputs; returns the bool mask (all True when None)."""
    check_float("hidden", hidden, ndim=(2, 3))
    check_float("weight", weight, ndim=2)
    check_tensor("ids", ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"ids must be an integer tensor of token ids, got {ids.dtype}")
    if ids.shape != hidden.shape[:-1]:
        raise ValueError(f"ids must be {list(hidden.shape[:-1])} to match hidden {list(hidden.shape)} "
                         f"(position t scores token ids[t]), got {list(ids.shape)}")
    H = hidden.shape[-1]
    if weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with H={H} (hidden's last dimension) and V >= 1, "
                         f"got {list(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None:
        check_float("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V]={[weight.shape[0]]} to match weight {list(weight.shape)}, "
                             f"got {list(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else check_mask("mask", mask, "ids", ids)
    check_same_device(hidden=hidden, weight=weight, ids=ids, bias=bias, mask=mask)
    return valid


# --- vocabulary parallelism ------------------------------------------------------------------------


def _shard_offsets(weight: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vocab_start [1], vocab_total [])`` of this rank's shard: one all-gather of an int per rank."""
    dist = torch.distributed
    size = torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    sizes_t = torch.cat(sizes)
    rank = dist.get_rank(group)
    return sizes_t[:rank].sum().reshape(1), sizes_t.sum()


class _CopyToGroup(torch.autograd.Function):
    """Identity forward, gradient summed over the group: every shard's logits read the same hidden."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        torch.distributed.all_reduce(g, group=ctx.group)
        return g, None


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward: each rank holds the same replicated loss."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


# --- reference -------------------------------------------------------------------------------------


def _linear_token_logprobs_torch(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 ids: torch.Tensor, valid: torch.Tensor, temperature: float,
                                 group: Any = None, vocab_start: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)`` ``[N]`` from ``hidden`` ``[N, H]``: the logits materialised, then ``token_logprobs``.

    Masked rows of ``hidden`` are replaced by 0 first, so NaN there reaches neither outputs nor gradients.
    """
    dtype = compute_dtype(hidden, weight, bias)
    h = torch.where(valid[:, None], hidden.to(dtype), torch.zeros((), dtype=dtype, device=hidden.device))
    safe_ids = torch.where(valid, ids, torch.zeros_like(ids))
    if group is None:
        logits = h @ weight.to(dtype).T
        if bias is not None:
            logits = logits + bias.to(dtype)
        logp, entropy = _token_logprobs_torch(logits[None], safe_ids[None], temperature, True)
        zero = torch.zeros((), dtype=dtype, device=hidden.device)
        return torch.where(valid, logp[0], zero), torch.where(valid, entropy[0], zero)
    # vocabulary-parallel: this rank's logits [N, V_r]; per-token statistics summed over the group
    z = _CopyToGroup.apply(h, group) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    z = z / temperature
    m = z.detach().max(-1).values
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    e = torch.exp(z - m[:, None])
    s = _SumOverGroup.apply(e.sum(-1), group)
    u = _SumOverGroup.apply(torch.where(e > 0, e * (z - m[:, None]), torch.zeros_like(e)).sum(-1), group)
    local = safe_ids.long() - vocab_start
    own = (local >= 0) & (local < weight.shape[0])
    z_own = z.gather(-1, torch.where(own, local, torch.zeros_like(local))[:, None])[:, 0]
    zt = _SumOverGroup.apply(torch.where(own, z_own, torch.zeros_like(z_own)), group)
    zero = torch.zeros((), dtype=dtype, device=hidden.device)
    logp = torch.clamp((zt - m) - torch.log(s), max=0.0)  # nearby numbers first: no rounded lse near |z| = 1e4
    entropy = torch.log(s) - u / s
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


# --- public API ------------------------------------------------------------------------------------

def _check_max_tile_bytes(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_tile_bytes must be an int (bytes) or None, got {value!r}")
    if value < 1:
        raise ValueError(f"max_tile_bytes must be >= 1 byte, got {value}")
    return value


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    entropy_grad: bool = True,
    group: Any = None,
    max_tile_bytes: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Log-prob of each sampled token, and optionally the entropy, from hidden states and the LM head.

    ::

        z = (hidden @ weight.T + bias) / temperature  # tile by tile (Triton)
        logp[t] = z[t, ids[t]] - logsumexp_v z[t, v]
        entropy[t] = logsumexp_v z[t, v] - sum_v p_v z[t, v],   p = softmax(z[t])

    The same numbers as ``token_logprobs(hidden @ weight.T + bias, ids, temperature=temperature)``
    on logits computed in fp32 (a bf16 LM head rounds its logits to bf16 first; here they are
    not rounded, nor in TRL 1.16's head's bf16 tiles). The statistics are folded online over the
    vocabulary (Milakov & Gimelshein 2018, arXiv 1805.02867), as Cut Cross-Entropy (Wijmans et al.
    2024, arXiv 2411.09009) does for the loss alone, with the entropy and the temperature added.
    The Triton backend walks the tokens (valid ones packed first, on the device) in chunks of ``C``,
    each chunk's logits over the whole vocabulary one fp32 tile ``[C, V]`` from the library matmul
    (cuBLAS: bf16 operands, fp32 accumulation and output), read by Triton row epilogues: its extra
    memory is the tile, the fp32 ``d weight`` accumulator and ``O(N)``, never a term in ``N * V``.
    The forward keeps ``lse`` and the entropy, ``[N]``; backward recomputes each tile, writes
    ``d logits`` over it and forms ``d hidden = d logits @ weight`` (rounded once) and ``d weight
    += d logits^T @ hidden`` (fp32): 4 matmuls over the head for any upstream gradient (the loss
    path of ``policy_loss_from_hidden`` takes 3). Deterministic (no atomics); no host sync.

    Args:
        hidden: ``[B, T, H]`` or ``[N, H]`` final hidden states (fp16, bf16, fp32; fp64 in the
            reference), position ``t`` scoring token ``ids[t]``: for a causal LM
            ``outputs.hidden_states[-1][:, P - 1:-1]`` for completions after ``P`` prompt tokens
            (a slice: read row by row, never copied whole).
        weight: ``[V, H]`` the LM head (``model.lm_head.weight``), hidden's dtype; with ``group``,
            this rank's contiguous rows of it.
        ids: ``[B, T]`` or ``[N]`` integer token ids, global ids with ``group``; in ``[0, V)``
            where ``mask`` is True (checked: ``ValueError`` on CPU, a device-side assert on CUDA).
        bias: ``[V]`` or None, weight's dtype (this rank's slice with ``group``).
        temperature: the sampler's temperature, ``> 0``.
        mask: bool (or numeric, non-zero valid) of ``ids``' shape, or None (all valid). Where
            False: outputs 0, gradient 0, the id is never read (padding may hold -100). Padding
            still takes its rows of the matmuls (the chunk count comes from ``N``: the number of
            valid tokens is known only on the device); heavy padding is cheaper packed first
            (``hidden[mask]``, ``ids[mask]``: a host sync of the caller's choosing).
        return_entropy: also return the entropy.
        entropy_grad: whether the returned entropy carries a gradient. ``False`` returns it detached
            (a metric, an entropy mask); backward then forms no entropy term.
        group: None (one unsharded LM head), or the ``torch.distributed`` group of a
            vocabulary-parallel head (Megatron layout: rank ``r`` holds rows ``[start_r, start_r +
            V_r)`` of the full weight, in rank order; shards may differ in size). Every rank
            passes the same ``hidden`` and ``ids`` and gets the unsharded call's outputs and
            ``d hidden`` (summed over ranks inside backward: do not sum it again), and the
            gradient of its own weight rows. Per chunk, ``[C]`` statistics cross ranks in the
            forward and ``d hidden``'s fp32 ``[C, H]`` partial sums in backward. Compiles with
            ``fullgraph=True`` too (the collectives are traced; the loop over chunks makes the
            graph specific to ``N``).
        max_tile_bytes: the largest logits tile, ``4 * C * V`` bytes (``V`` this rank's rows),
            for ``C`` tokens: all ``N`` if they fit, else a multiple of 128. None: ``e V H + 4 N H
            + 256 MiB`` (``e`` bytes per element of ``hidden``), so that the extra memory beyond
            inputs, outputs and gradients stays at or below TRL 1.16's head (``4 V H + 4 N H + 256
            MiB``, its fp32 accumulators and one bf16 tile); with ``group``, ``e H / 4`` tokens (a
            height every rank computes alike; a given budget must give every rank the same
            height: checked on the device). Only the Triton backend tiles.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``logp`` fp32 (fp64 for fp64 inputs), shaped as ``ids``, or ``(logp, entropy)``.
    """
    for name, flag in (("return_entropy", return_entropy), ("entropy_grad", entropy_grad)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    logp, entropy = _logprobs_and_entropy(hidden, weight, ids, bias, temperature, mask, group, backend,
                                          _check_max_tile_bytes(max_tile_bytes))
    if not (return_entropy and entropy_grad):
        entropy = entropy.detach()
    return (logp, entropy) if return_entropy else logp


def _checked_head(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None,
                  temperature: float, mask: torch.Tensor | None, group: Any
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the LM-head inputs once: ``(valid, vocab_start)``, ``valid`` the bool mask ``[N]``,
    ``vocab_start`` this rank's first id (a device ``[1]``) with ``group``, else None."""
    valid = _check_hidden_inputs(hidden, weight, ids, bias, mask).reshape(-1)
    check_number("temperature", temperature, low=0, low_inclusive=False)
    if group is None:
        vocab_start, vocab = None, weight.shape[0]
    else:
        vocab_start, vocab = _shard_offsets(weight, group)
    check_ids_in_vocab(ids.reshape(-1), vocab, where=valid, of="weight")
    return valid, vocab_start


def _logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None,
                          temperature: float, mask: torch.Tensor | None, group: Any, backend: str,
                          max_tile_bytes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear_token_logprobs``'s ``(logp, entropy)``, validated and dispatched (the general path)."""
    valid, vocab_start = _checked_head(hidden, weight, ids, bias, temperature, mask, group)
    chosen = resolve_backend(backend, hidden, weight, ids, bias)
    if chosen == "triton" and hidden.dtype != torch.float64:
        from ._fused import linear_token_logprobs_triton

        logp, entropy = linear_token_logprobs_triton(hidden, weight, bias, ids.reshape(-1), valid, temperature, group,
                                                     vocab_start, max_tile_bytes)
    else:
        logp, entropy = _linear_token_logprobs_torch(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                                     ids.reshape(-1), valid, temperature, group, vocab_start)
    return logp.reshape(ids.shape), entropy.reshape(ids.shape)


def policy_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    entropy_coef: float = 0.0,
    group: Any = None,
    max_tile_bytes: int | None = None,
    backend: str = "auto",
    **loss_options: Any,
) -> PolicyLoss:
    r"""``policy_loss`` of the sampled tokens' log-probs computed from hidden states, with an entropy bonus.

    ``logp, H = linear_token_logprobs(hidden, weight, ids, mask=mask, return_entropy=True, ...)``,
    then ``policy_loss(logp, old_logp, adv, mask, **loss_options)`` (every option: objectives,
    clip range, KL, token weights, aggregation, global counts, ``dp_size``) minus
    ``entropy_coef`` times the entropy aggregated with the same aggregation and counts (verl's
    ``entropy_coeff``; 0 in DAPO and Dr. GRPO). Exactly ``policy_loss_from_logits`` on the
    logits ``hidden @ weight.T + bias`` (computed in fp32), loss and gradients, without the logits.
    Metrics gain ``entropy_mean``, the masked mean entropy.

    The Triton backend walks the tokens (valid ones packed first, on the device) in chunks of ``C``,
    each chunk's logits over the whole vocabulary one fp32 tile ``[C, V]`` from the library matmul
    (cuBLAS: bf16 operands, fp32 accumulation and output), read by Triton row epilogues: its extra
    memory is the tile, the fp32 ``d weight`` accumulator and ``O(N)``, never a term in ``N * V``.
    Two paths there. The loss path, for a token-local objective (PPO at token level, with dual
    clip or ``delta``, CISPO, SAPO, REINFORCE, DPPO, DRO; any KL kind, token-level bias
    correction, token weights, every aggregation and count, the entropy bonus): d loss / d logp
    of a token is known once its log-prob is, so each chunk's gradient is formed in the forward
    (``d logits`` over the tile, then ``d hidden`` and ``d weight``) and the logits are computed
    once: 3 matmuls over the head; backward multiplies the stored gradients by the upstream
    scalar (``d hidden`` is kept in hidden's dtype, so a gradient scaled by other than 1 is
    rounded twice). The general path, for objectives that need a whole row or batch first (GSPO,
    LUSPO, VESPO, GMPO, sequence-level bias correction, KL-Cov, Clip-Cov):
    ``linear_token_logprobs`` then ``policy_loss``, 4 matmuls.

    Args:
        hidden: ``[B, T, H]`` (see ``linear_token_logprobs``); receives the gradient.
        weight: ``[V, H]`` LM head; receives the gradient. bias: ``[V]`` or None.
        ids: ``[B, T]`` sampled token ids (padding may hold anything where ``mask`` is False).
        old_logp, adv, mask: as in ``policy_loss`` (``mask`` required).
        temperature: the sampler's temperature, ``> 0``.
        entropy_coef: ``>= 0``.
        group: vocabulary-parallel process group, see ``linear_token_logprobs``.
        max_tile_bytes: the logits tile's budget, see ``linear_token_logprobs``.
        backend: ``"auto" | "torch" | "triton"``, for the log-probs and the loss.
        **loss_options: keyword options of ``policy_loss``.

    Returns:
        ``PolicyLoss(loss, metrics)`` as ``policy_loss``, with ``metrics["entropy_mean"]``.
    """
    check_float("hidden", hidden, ndim=3)
    mask_b = check_mask("mask", mask, "ids", check_tensor("ids", ids, ndim=2))
    check_number("entropy_coef", entropy_coef, low=0)
    max_tile_bytes = _check_max_tile_bytes(max_tile_bytes)
    if "backend" in loss_options:
        raise TypeError("backend is given once, for both the log-probs and the loss")
    _check_option_names("policy_loss_from_hidden", loss_options)
    fused = _loss_path(hidden, weight, ids, old_logp, adv, mask_b, bias, temperature, entropy_coef, group,
                       max_tile_bytes, backend, loss_options)
    if fused is not None:
        return fused
    logp, entropy = _logprobs_and_entropy(hidden, weight, ids, bias, temperature, mask_b, group, backend,
                                          max_tile_bytes)
    if entropy_coef == 0:  # a metric (entropy_mean), no gradient
        entropy = entropy.detach()
    out = policy_loss(logp, old_logp, adv, mask, backend=backend, **loss_options)
    return _with_entropy_bonus(out, entropy, mask_b, entropy_coef, loss_options)


def _loss_path(hidden, weight, ids, old_logp, adv, mask_b, bias, temperature, entropy_coef, group, max_tile_bytes,
               backend, loss_options) -> PolicyLoss | None:
    """``policy_loss_from_hidden`` by the fused loss path, or None where it does not apply (another
    backend, fp64, an objective that is not token-local)."""
    if resolve_backend(backend, hidden, weight, ids, bias, old_logp, adv) != "triton" or hidden.dtype == torch.float64:
        return None
    from ._fused import fused_dtype, policy_loss_from_hidden_triton, token_local

    # the loss's options checked against a placeholder of the log-probs' shape (they do not exist yet)
    placeholder = torch.zeros((), dtype=torch.float32, device=hidden.device).expand(ids.shape)
    args = _checked_loss_options(placeholder, old_logp, adv, mask_b, loss_options)
    (_, old_logp, adv, mask_b, objective, ref_logp, beta, kl, kl_bias_correction, token_weights, max_log_ratio,
     aggregation, max_tokens, num_tokens, num_seqs, dp_size) = args
    if not token_local(objective, kl_bias_correction) or not fused_dtype(old_logp, adv, ref_logp, token_weights):
        return None
    valid, vocab_start = _checked_head(hidden, weight, ids, bias, temperature, mask_b, group)
    scale = _token_scale(mask_b, aggregation, max_tokens=max_tokens, num_tokens=num_tokens, num_seqs=num_seqs,
                         dp_size=dp_size)
    if not isinstance(num_tokens, torch.Tensor):  # as policy_loss's fused path: only a count on the host warns
        warn_if_empty(num_tokens, EMPTY_STEP)
    loss, metrics = policy_loss_from_hidden_triton(
        hidden, weight, bias, ids, mask_b, temperature, entropy_coef, group, vocab_start, max_tile_bytes, scale,
        old_logp, adv, objective, ref_logp, beta, kl, kl_bias_correction, token_weights, max_log_ratio, aggregation,
        max_tokens, num_tokens, num_seqs, dp_size)
    return PolicyLoss(loss, metrics)

