"""The loss straight from logits: token log-probabilities, entropy, and ``policy_loss`` on them."""

from __future__ import annotations

import inspect
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
    warn_if_empty,
)
from .aggregation import _aggregate, _safe_div
from .loss import EMPTY_STEP, PolicyLoss, _check_policy_loss_args, policy_loss

# policy_loss's keyword options and their defaults, read from its signature (one source)
POLICY_LOSS_OPTIONS = {name: p.default for name, p in inspect.signature(policy_loss).parameters.items()
                       if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "backend"}


def _check_logits(logits: object, ids: object) -> None:
    check_float("logits", logits, ndim=3)
    check_tensor("ids", ids, ndim=2)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"ids must be an integer tensor of token ids, got {ids.dtype}")
    if ids.shape != logits.shape[:2]:
        raise ValueError(f"ids must be [B, T]={list(logits.shape[:2])} to match logits {list(logits.shape)}, "
                         f"got {list(ids.shape)}{_causal_hint(logits, ids)}")
    if logits.shape[2] == 0:
        raise ValueError(f"logits must have a vocabulary of at least one token, got shape {list(logits.shape)}")
    check_same_device(logits=logits, ids=ids)


def _causal_hint(logits: torch.Tensor, ids: torch.Tensor) -> str:
    """How to align a causal LM's logits with the ids, when the shapes say that is the likely mistake."""
    extra = logits.shape[1] - ids.shape[1]
    if ids.shape[0] != logits.shape[0] or extra < 1:
        return ""
    return (f". The logits are {extra} position{'s' if extra > 1 else ''} longer than the ids, as a causal LM's are "
            f"over prompt + completion, and their position t scores token t+1: for the completion ids of a prompt "
            f"of length P take logits[:, P-1:-1] (here logits[:, {extra - 1}:-1] if ids are the last "
            f"{ids.shape[1]} tokens of the input), or for the whole input logits[:, :-1] with ids = input_ids[:, 1:]")


def _token_logprobs_torch(logits: torch.Tensor, ids: torch.Tensor, temperature: float,
                          return_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dtype) / temperature
    log_probs = torch.log_softmax(z, dim=-1)
    logp = log_probs.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    entropy = None
    if return_entropy:  # p log p -> 0 where p = 0 (a logit of -inf, a masked vocabulary entry)
        probs = log_probs.exp()
        finite = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))  # no 0 * -inf, even in backward
        entropy = -(probs * finite).sum(-1)
    return logp, entropy


def token_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Log-probability of each sampled token, and optionally the entropy, from logits.

    ::

        z = logits / temperature
        logp[b, t] = z[b, t, ids[b, t]] - logsumexp_v z[b, t, v]
        entropy[b, t] = -sum_v p_v log p_v,   p = softmax(z[b, t])

    The temperature must be the one the sampler used (vLLM/TRL divide logits by it before
    sampling), or the log-probs belong to another policy than the one that sampled. The same
    holds for truncated sampling: these are log-probs of the full softmax, the sampler's only
    with ``top_k`` and ``top_p`` off (Hugging Face ``generate`` samples with ``top_k=50`` by
    default: pass ``do_sample=True, top_k=0, top_p=1.0`` and this temperature). The Triton
    backend streams the vocabulary in chunks with an online logsumexp (Milakov & Gimelshein 2018,
    arXiv 1805.02867): it never materialises ``[B, T, V]`` probabilities or a log-softmax; its
    backward writes ``d / d logits`` in one more pass. The reference computes ``log_softmax``.

    With ``mask``, positions where it is False are padding: their id is never read (it may be
    ``-100`` or anything else) and their ``logp`` and entropy are 0, with zero gradient into the
    logits (the logits of those positions are still read, so they must be finite there, as a
    model's output is).

    A causal LM's logits at position ``t`` score the token at ``t + 1``: for completion ids of a
    prompt of length ``P`` pass ``logits[:, P-1:-1]``; for the whole input, ``logits[:, :-1]`` with
    ``input_ids[:, 1:]``. Logits longer than the ids get an error that says so; logits of the
    same length but not shifted cannot be told apart from aligned ones.

    Args:
        logits: ``[B, T, V]`` (fp16, bf16, fp32 or fp64), where position ``t`` scores token
            ``ids[:, t]`` (a causal LM's, sliced as above); receives the gradient.
        ids: ``[B, T]`` integer token ids, in ``[0, V)`` wherever ``mask`` is True.
        temperature: ``> 0``, the sampler's.
        mask: None (every position is a token) or ``[B, T]`` bool, or numeric where non-zero means
            valid.
        return_entropy: also return the entropy of each position's distribution.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``logp`` ``[B, T]`` fp32 (fp64 for fp64 logits), or ``(logp, entropy)``; 0 where ``mask``
        is False.

    Raises:
        ValueError: ids out of ``[0, V)`` at a valid position (the message says to mask padding),
            shapes that do not match (with the causal-LM slice when the logits are longer).
    """
    _check_logits(logits, ids)
    check_number("temperature", temperature, low=0, low_inclusive=False)
    mask_b = None
    if mask is not None:
        mask_b = check_mask("mask", mask, "ids", ids)
        check_same_device(logits=logits, mask=mask_b)
        ids = torch.where(mask_b, ids, torch.zeros_like(ids))  # padding ids are never read as tokens
    check_ids_in_vocab(ids, logits.shape[2])
    if resolve_backend(backend, logits, ids) == "triton" and logits.dtype != torch.float64:
        from ._fused import token_logprobs_triton

        logp, entropy = token_logprobs_triton(logits, ids, temperature, return_entropy)
    else:
        logp, entropy = _token_logprobs_torch(logits, ids, temperature, return_entropy)
    if mask_b is not None:  # selected, not multiplied: no gradient reaches the padding's logits
        logp = torch.where(mask_b, logp, torch.zeros_like(logp))
        if entropy is not None:
            entropy = torch.where(mask_b, entropy, torch.zeros_like(entropy))
    return (logp, entropy) if return_entropy else logp


def _check_option_names(caller: str, loss_options: dict[str, Any]) -> None:
    unknown = sorted(set(loss_options) - set(POLICY_LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"{caller} got an unexpected keyword argument {unknown[0]!r} (the loss options are "
                        f"policy_loss's: {sorted(POLICY_LOSS_OPTIONS)})")


def _checked_loss_options(logp: torch.Tensor, old_logp: torch.Tensor | None, adv: torch.Tensor, mask: torch.Tensor,
                          loss_options: dict[str, Any]) -> tuple:
    """``policy_loss``'s keyword options (its defaults where not given) validated against ``logp``, a
    ``[B, T]`` stand-in for log-probs not computed yet: ``_check_policy_loss_args``' tuple."""
    return _check_policy_loss_args(logp, old_logp, adv, mask, **{**POLICY_LOSS_OPTIONS, **loss_options})


def policy_loss_from_logits(
    logits: torch.Tensor,
    ids: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy_coef: float = 0.0,
    inplace_backward: bool = False,
    backend: str = "auto",
    **loss_options: Any,
) -> PolicyLoss:
    r"""``policy_loss`` of the sampled tokens' log-probs, computed from the logits, with an entropy bonus.

    ``logp, H = token_logprobs(logits, ids, temperature, return_entropy=True)``, then
    ``policy_loss(logp, old_logp, adv, mask, **loss_options)`` (every option: clip range, dual
    clip, level, KL, aggregation, counts, ``dp_size``) minus ``entropy_coef`` times the entropy
    aggregated with the same aggregation and counts (verl's ``entropy_coeff``; 0 by default, as in
    DAPO and Dr. GRPO). Metrics gain ``entropy_mean``, the masked mean entropy.

    Ids at masked positions are never read as tokens (padding may hold -100 there); their loss and
    gradient are zero. With ``inplace_backward=True`` the Triton backward writes ``d loss / d
    logits`` into the logits buffer itself (no second ``[B, T, V]`` tensor): the logits' values are
    gone after backward, so use it only when nothing else needs them (a loss computed on a model's
    fresh output). The reference ignores the flag.

    Args:
        logits: ``[B, T, V]`` aligned with ``ids`` (see ``token_logprobs``); receives the gradient.
        ids: ``[B, T]`` sampled token ids.
        old_logp, adv, mask: as in ``policy_loss``.
        temperature: the sampler's temperature, ``> 0``.
        entropy_coef: ``>= 0``; the loss subtracts ``entropy_coef * agg(H)``.
        inplace_backward: Triton only, see above.
        backend: ``"auto" | "torch" | "triton"``.
        **loss_options: keyword options of ``policy_loss``.

    Returns:
        ``PolicyLoss(loss, metrics)`` as ``policy_loss``, with ``metrics["entropy_mean"]``.
    """
    _check_logits(logits, ids)
    mask_b = check_mask("mask", mask, "ids", ids)
    check_number("temperature", temperature, low=0, low_inclusive=False)
    check_number("entropy_coef", entropy_coef, low=0)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    if "backend" in loss_options:
        raise TypeError("backend is given once, for both the log-probs and the loss")
    chosen = resolve_backend(backend, logits, ids, old_logp, adv, mask)
    _check_option_names("policy_loss_from_logits", loss_options)
    if chosen == "triton":
        from ._fused import fused_dtype, fused_support, policy_loss_from_logits_triton

        # the loss options checked once, against a [B, T] stand-in for the log-probs (a view: no launch)
        args = _checked_loss_options(logits[..., 0], old_logp, adv, mask, loss_options)
        if fused_support(args[4], args[8]) is None and fused_dtype(logits, old_logp, adv, args[5], args[9]):
            num_tokens = loss_options.get("num_tokens")
            if not isinstance(num_tokens, torch.Tensor):  # as policy_loss's fused path: only a host count warns
                warn_if_empty(num_tokens, EMPTY_STEP)
            return PolicyLoss(*policy_loss_from_logits_triton(logits, ids, temperature, entropy_coef,
                                                              inplace_backward, *args[1:]))
    safe_ids = torch.where(mask_b, ids, torch.zeros_like(ids))  # padding ids are never tokens
    check_ids_in_vocab(safe_ids, logits.shape[2])
    if chosen == "triton" and logits.dtype != torch.float64:
        from ._fused import token_logprobs_triton

        logp, entropy = token_logprobs_triton(logits, safe_ids, temperature, True, inplace_backward=inplace_backward)
    else:
        logp, entropy = _token_logprobs_torch(logits, safe_ids, temperature, True)
    # the user's backend, not the resolved one: "auto" lets the loss fall back for objectives without a kernel
    out = policy_loss(logp, old_logp, adv, mask, backend=backend, **loss_options)
    return _with_entropy_bonus(out, entropy, mask_b, entropy_coef, loss_options)


def _with_entropy_bonus(out: PolicyLoss, entropy: torch.Tensor, mask_b: torch.Tensor, entropy_coef: float,
                        loss_options: dict[str, Any]) -> PolicyLoss:
    """``out`` minus ``entropy_coef`` times the entropy aggregated as the loss was, plus ``entropy_mean``."""
    ent = torch.where(mask_b, entropy, torch.zeros_like(entropy))
    metrics = dict(out.metrics)
    metrics["entropy_mean"] = _safe_div(ent.detach().sum(), mask_b.sum().to(ent.dtype))
    loss = out.loss
    if entropy_coef != 0:
        # a one-element tensor count is 0-d inside policy_loss: the same here, or the loss turns [1]
        counts = {k: loss_options.get(k) for k in ("max_tokens", "num_tokens", "num_seqs")}
        counts = {k: v.reshape(()) if isinstance(v, torch.Tensor) else v for k, v in counts.items()}
        loss = loss - entropy_coef * _aggregate(ent, mask_b, loss_options.get("aggregation", "token_mean"),
                                                dp_size=loss_options.get("dp_size", 1), **counts)
    return PolicyLoss(loss, metrics)
