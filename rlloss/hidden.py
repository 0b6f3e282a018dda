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
    check_float,
    check_ids_in_vocab,
    check_mask,
    check_number,
    check_same_device,
    check_tensor,
    compute_dtype,
)
from .logits import _token_logprobs_torch, _with_entropy_bonus
from .loss import PolicyLoss, policy_loss

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
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Log-prob of each sampled token, and optionally the entropy, from hidden states and the LM head.

    ::

        z = (hidden @ weight.T + bias) / temperature  # never built by Triton
        logp[t] = z[t, ids[t]] - logsumexp_v z[t, v]
        entropy[t] = logsumexp_v z[t, v] - sum_v p_v z[t, v],   p = softmax(z[t])

    The same numbers as ``token_logprobs(hidden @ weight.T + bias, ids, temperature=temperature)``
    on logits computed in fp32 (a bf16 LM head rounds its logits to bf16 first; here they are
    not rounded). The Triton backend walks the vocabulary in blocks with an online logsumexp
    (Milakov & Gimelshein 2018, arXiv 1805.02867) inside the matmul, as Cut Cross-Entropy
    (Wijmans et al. 2024, arXiv 2411.09009) does for the loss alone, and adds the entropy and the
    temperature: its extra memory is the fp32 gradient accumulators plus ``O(N)``, never
    ``[N, V]``. Deterministic (no atomics); no host sync.

    Args:
        hidden: ``[B, T, H]`` or ``[N, H]`` final hidden states (fp16, bf16, fp32; fp64 in the
            reference), position ``t`` scoring token ``ids[t]``: for a causal LM
            ``outputs.hidden_states[-1][:, P - 1:-1]`` for completions after ``P`` prompt tokens.
        weight: ``[V, H]`` the LM head (``model.lm_head.weight``), hidden's dtype; with ``group``,
            this rank's contiguous rows of it.
        ids: ``[B, T]`` or ``[N]`` integer token ids, global ids with ``group``; in ``[0, V)``
            where ``mask`` is True (checked: ``ValueError`` on CPU, a device-side assert on CUDA).
        bias: ``[V]`` or None, weight's dtype (this rank's slice with ``group``).
        temperature: the sampler's temperature, ``> 0``.
        mask: bool (or numeric, non-zero valid) of ``ids``' shape, or None (all valid). Where
            False: outputs 0, gradient 0, the id is never read (padding may hold -100), and the
            Triton backend spends no matmul on the position.
        return_entropy: also return the entropy.
        entropy_grad: whether the returned entropy carries a gradient. ``False`` returns it detached
            (a metric, an entropy mask). With only the log-prob differentiated (that, or
            ``return_entropy=False``), the Triton backend forms ``d logp / d hidden`` in its
            forward pass (with ``group``, summed over the ranks there), so backward recomputes the logits once (for ``d weight``) instead
            of twice: 4 matmuls over the head, not 5. Its fp32 ``[N, H]`` replaces the ``d hidden``
            accumulator but is held from the forward to the backward.
        group: None (one unsharded LM head), or the ``torch.distributed`` group of a
            vocabulary-parallel head (Megatron layout: rank ``r`` holds rows ``[start_r, start_r +
            V_r)`` of the full weight, in rank order; shards may differ in size). Every rank
            passes the same ``hidden`` and ``ids`` and gets the unsharded call's outputs and
            ``d hidden`` (summed over ranks inside backward: do not sum it again), and the
            gradient of its own weight rows. Forward sends only ``[N]`` statistics across ranks.
            Compiles with ``fullgraph=True`` too (the collectives are traced, no graph break).
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``logp`` fp32 (fp64 for fp64 inputs), shaped as ``ids``, or ``(logp, entropy)``.
    """
    for name, flag in (("return_entropy", return_entropy), ("entropy_grad", entropy_grad)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    logp, entropy = _logprobs_and_entropy(hidden, weight, ids, bias, temperature, mask, group, backend,
                                          entropy_grad=return_entropy and entropy_grad)
    return (logp, entropy) if return_entropy else logp


def _logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None,
                          temperature: float, mask: torch.Tensor | None, group: Any, backend: str, *,
                          entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear_token_logprobs``'s ``(logp, entropy)``, validated and dispatched. ``entropy_grad``: the
    entropy may carry a gradient; else it is returned detached, and the Triton backend forms
    ``d logp / d hidden`` in its forward pass (4 matmuls over the head, not 5)."""
    valid = _check_hidden_inputs(hidden, weight, ids, bias, mask)
    check_number("temperature", temperature, low=0, low_inclusive=False)
    chosen = resolve_backend(backend, hidden, weight, ids, bias)
    shape = ids.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    ids1, valid1 = ids.reshape(-1), valid.reshape(-1)
    if group is None:
        vocab_start, vocab = None, weight.shape[0]
    else:
        vocab_start, vocab = _shard_offsets(weight, group)
    check_ids_in_vocab(ids1, vocab, where=valid1, of="weight")
    if chosen == "triton" and hidden.dtype != torch.float64:
        from ._fused import linear_token_logprobs_triton

        logp, entropy = linear_token_logprobs_triton(h2, weight, bias, ids1, valid1, temperature, group, vocab_start,
                                                     entropy_grad)
    else:
        logp, entropy = _linear_token_logprobs_torch(h2, weight, bias, ids1, valid1, temperature, group, vocab_start)
    if not entropy_grad:  # the promise that lets the forward form d logp / d hidden, kept on both backends
        entropy = entropy.detach()
    return logp.reshape(shape), entropy.reshape(shape)


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
    backend: str = "auto",
    **loss_options: Any,
) -> PolicyLoss:
    r"""``policy_loss`` of the sampled tokens' log-probs computed from hidden states, with an entropy bonus.

    ``logp, H = linear_token_logprobs(hidden, weight, ids, mask=mask, return_entropy=True,
    entropy_grad=entropy_coef != 0, ...)``,
    then ``policy_loss(logp, old_logp, adv, mask, **loss_options)`` (every option: objectives,
    clip range, KL, token weights, aggregation, global counts, ``dp_size``) minus
    ``entropy_coef`` times the entropy aggregated with the same aggregation and counts (verl's
    ``entropy_coeff``; 0 in DAPO and Dr. GRPO). Exactly ``policy_loss_from_logits`` on the
    logits ``hidden @ weight.T + bias`` (computed in fp32), loss and gradients, without the logits.
    Metrics gain ``entropy_mean``, the masked mean entropy.

    Args:
        hidden: ``[B, T, H]`` (see ``linear_token_logprobs``); receives the gradient.
        weight: ``[V, H]`` LM head; receives the gradient. bias: ``[V]`` or None.
        ids: ``[B, T]`` sampled token ids (padding may hold anything where ``mask`` is False).
        old_logp, adv, mask: as in ``policy_loss`` (``mask`` required).
        temperature: the sampler's temperature, ``> 0``.
        entropy_coef: ``>= 0``.
        group: vocabulary-parallel process group, see ``linear_token_logprobs``.
        backend: ``"auto" | "torch" | "triton"``, for the log-probs and the loss.
        **loss_options: keyword options of ``policy_loss``.

    Returns:
        ``PolicyLoss(loss, metrics)`` as ``policy_loss``, with ``metrics["entropy_mean"]``.
    """
    check_float("hidden", hidden, ndim=3)
    mask_b = check_mask("mask", mask, "ids", check_tensor("ids", ids, ndim=2))
    check_number("entropy_coef", entropy_coef, low=0)
    if "backend" in loss_options:
        raise TypeError("backend is given once, for both the log-probs and the loss")
    # the entropy carries a gradient only with a bonus; without one it is a metric (entropy_mean)
    logp, entropy = _logprobs_and_entropy(hidden, weight, ids, bias, temperature, mask_b, group, backend,
                                          entropy_grad=entropy_coef != 0)
    out = policy_loss(logp, old_logp, adv, mask, backend=backend, **loss_options)
    return _with_entropy_bonus(out, entropy, mask_b, entropy_coef, loss_options)
