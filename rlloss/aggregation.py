"""Masked reductions and the loss aggregations that decide a recipe's normaliser."""

from __future__ import annotations

import torch

from ._constants import AGGREGATIONS
from ._dispatch import resolve_backend
from ._validate import check_count, check_float, check_mask, check_number, check_same_device, compute_dtype



def _as_count(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A count or normaliser as a 0-d tensor of ``like``'s dtype and device.

    ``torch.full``, not ``torch.as_tensor``: under ``torch.compile(dynamic=True)`` a count taken
    from a shape (the batch size) stays symbolic instead of being burnt into the graph (which
    would recompile for every batch size).
    """
    if isinstance(value, torch.Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _safe_div(num: torch.Tensor, den: torch.Tensor | float) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else 0 with zero gradient: an empty input is never NaN."""
    den = _as_count(den, num)
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _masked_mean_torch(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None, normalizer: float | torch.Tensor | None
) -> torch.Tensor:
    dtype = compute_dtype(x)
    kept = torch.where(mask, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))
    total = kept.sum() if dim is None else kept.sum(dim)
    if normalizer is None:
        count = mask.sum() if dim is None else mask.sum(dim)
        normalizer = count.to(dtype)
    elif isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.detach().to(dtype)
    return _safe_div(total, normalizer)


def masked_mean(
    x: torch.Tensor,
    mask: torch.Tensor,
    dim: int | None = None,
    *,
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""``sum(x * mask, dim) / normalizer``, with ``normalizer = mask.sum(dim)`` by default.

    A given ``normalizer`` (number or tensor broadcastable to the result) overrides the count:
    Dr. GRPO's constant ``MAX_TOKENS`` (Liu et al. 2025, arXiv 2503.20783), or a token count of the
    whole optimizer step under gradient accumulation. A zero normaliser gives 0 and zero gradient,
    never NaN; masked positions are selected out (not multiplied by 0), so NaN or inf there never
    reaches the result or the gradient.

    Args:
        x: floating tensor, any shape; carries the gradient.
        mask: same shape (bool, or numeric with non-zero meaning valid); no broadcasting.
        dim: the dimension to reduce, or None for all.
        normalizer: None, a non-negative number, or a tensor (treated as a constant).
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        fp32 (fp64 for fp64 ``x``): a scalar for ``dim=None``, else ``x``'s shape without ``dim``.
    """
    check_float("x", x)
    mask = check_mask("mask", mask, "x", x)
    check_same_device(x=x, mask=mask)
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int or None, got {dim!r}")
        if not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}, got {dim}")
    if isinstance(normalizer, torch.Tensor):
        out_shape = torch.Size([]) if dim is None else x.sum(dim).shape
        try:
            torch.broadcast_shapes(normalizer.shape, out_shape)
        except RuntimeError:
            raise ValueError(
                f"normalizer of shape {tuple(normalizer.shape)} does not broadcast to the result shape {tuple(out_shape)}"
            ) from None
        if torch.broadcast_shapes(normalizer.shape, out_shape) != out_shape:
            raise ValueError(
                f"normalizer of shape {tuple(normalizer.shape)} would enlarge the result shape {tuple(out_shape)}"
            )
        if normalizer.device != x.device:
            raise ValueError(f"normalizer must be on {x.device} like x, got {normalizer.device}")
    else:
        check_number("normalizer", normalizer, low=0, allow_none=True)
    if resolve_backend(backend, x, mask) == "triton" and x.dtype != torch.float64:
        from ._fused import masked_mean_triton

        return masked_mean_triton(x, mask, dim, normalizer)
    return _masked_mean_torch(x, mask, dim, normalizer)


def _aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str,
    *,
    max_tokens: float | None,
    num_tokens: float | torch.Tensor | None,
    num_seqs: float | torch.Tensor | None,
    dp_size: int,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss (already 0 where masked) to the recipe's scalar.

    See ``policy_loss`` for the table of aggregations. Arguments are assumed checked.
    """
    dtype = per_token.dtype
    n_seq = per_token.shape[0] if num_seqs is None else num_seqs
    n_seq = _as_count(n_seq, per_token)
    if aggregation == "token_mean":
        n_tok = mask.sum() if num_tokens is None else num_tokens
        loss = _safe_div(per_token.sum(), _as_count(n_tok, per_token))
    elif aggregation == "seq_mean_token_mean":
        row = _safe_div(per_token.sum(-1), mask.sum(-1).to(dtype))
        loss = _safe_div(row.sum(), n_seq)
    elif aggregation == "seq_mean_token_sum":
        loss = _safe_div(per_token.sum(), n_seq)
    elif aggregation == "constant":  # Dr. GRPO
        loss = _safe_div(per_token.sum(), n_seq * max_tokens)
    else:  # token_sum (verl)
        loss = per_token.sum()
    return loss * dp_size


def _token_scale(
    mask: torch.Tensor,
    aggregation: str,
    *,
    max_tokens: float | None,
    num_tokens: float | torch.Tensor | None,
    num_seqs: float | torch.Tensor | None,
    dp_size: int,
) -> torch.Tensor:
    """fp32 ``[B, T]``: each token's weight in ``_aggregate``, ``d loss / d per_token``, 0 where masked.

    ``_aggregate(l, ...) = sum(l * _token_scale(...))``: ``dp_size`` times ``1 / N_tok`` (``token_mean``),
    ``1 / (n_i N_seq)`` (``seq_mean_token_mean``), ``1 / N_seq`` (``seq_mean_token_sum``),
    ``1 / (N_seq max_tokens)`` (``constant``) or 1 (``token_sum``), 0 where a normaliser is 0; the
    fused loss from hidden states forms its gradient with it before the loss is known. Arguments are
    assumed checked.
    """
    m = mask.to(torch.float32)
    one = torch.ones((), dtype=torch.float32, device=mask.device)
    n_seq = _as_count(mask.shape[0] if num_seqs is None else num_seqs, one)
    if aggregation == "token_mean":
        per = _safe_div(one, _as_count(mask.sum() if num_tokens is None else num_tokens, one))
    elif aggregation == "seq_mean_token_mean":
        per = _safe_div(one, n_seq) * _safe_div(torch.ones_like(m[:, :1]), m.sum(-1, keepdim=True))
    elif aggregation == "seq_mean_token_sum":
        per = _safe_div(one, n_seq)
    elif aggregation == "constant":  # Dr. GRPO
        per = _safe_div(one, n_seq * max_tokens)
    else:  # token_sum (verl)
        per = one
    return m * per * dp_size


def _check_aggregation(
    aggregation: str,
    *,
    max_tokens: object,
    num_tokens: object,
    num_seqs: object,
    dp_size: object,
    device: torch.device,
) -> tuple[float | None, float | torch.Tensor | None, float | torch.Tensor | None]:
    """Validate the aggregation options of ``policy_loss``; returns the checked counts."""
    from ._validate import check_choice

    check_choice("aggregation", aggregation, AGGREGATIONS)
    if aggregation == "constant":
        if max_tokens is None:
            raise ValueError('aggregation="constant" (Dr. GRPO) needs max_tokens, the generation budget; got None')
        check_number("max_tokens", max_tokens, low=0, low_inclusive=False)
    elif max_tokens is not None:
        check_number("max_tokens", max_tokens, low=0, low_inclusive=False)
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size must be an int >= 1, got {dp_size!r}")
    return max_tokens, check_count("num_tokens", num_tokens, device), check_count("num_seqs", num_seqs, device)
