r"""``audit_loss``: the objective a trainer's loss really optimises, measured by autograd.

Give it one micro-batch's loss exactly as a trainer computes it before ``backward()`` (its own
normaliser, its own scaling for gradient accumulation). The audit feeds it synthetic on-policy
batches (``rlloss.audit.probe``), split across ``micro_batches`` x ``dp_size`` pieces in several ways,
forms each optimizer step's gradient as DDP/FSDP do (summed over micro-batches, averaged over
ranks), and compares it with the gradient of each of rlloss's aggregations on the whole batch with
the step's counts. On-policy every objective's gradient in token ``t`` of row ``i`` is
``-A_i * w_it``, with ``w`` the aggregation's weight, so the comparison measures the normaliser and
nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import rlloss

from .._constants import AGGREGATIONS
from .probe import DEFAULT_MAX_LENGTH, Batch, Piece, Split, draw_batches, make_splits
from .result import MATCH, SPLIT_TOLERANCE, TIE, Audit


LossFn = Callable[..., torch.Tensor]
# (batch, split) -> (the step's loss, its gradient in batch.logp, [B, T])
StepFn = Callable[[Batch, Split], "tuple[float, torch.Tensor]"]
# (piece, its inputs) -> (the piece's loss as added to the step, its gradient in the piece's logp)
PieceFn = Callable[[Piece, "PieceInputs"], "tuple[float, torch.Tensor]"]


@dataclass(frozen=True)
class Window:
    """What a trainer knows about the optimizer step when it computes one micro-batch's loss.

    All Python ints: ``num_tokens`` (valid tokens of the whole step: every micro-batch, every
    rank), ``num_seqs`` (every row of the step, empty ones too, as
    ``rlloss.distributed.step_counts`` counts them), ``micro_batches`` and ``dp_size`` (the step's
    shape), ``micro_batch`` and ``rank`` (the indices of this call), ``max_tokens`` (the generation
    budget, or None). Read as ``window.num_tokens`` or ``window["num_tokens"]``.
    """

    num_tokens: int
    num_seqs: int
    micro_batches: int
    dp_size: int
    micro_batch: int
    rank: int
    max_tokens: int | None

    def __getitem__(self, key: str) -> int | None:
        if key not in self.__dataclass_fields__:
            raise KeyError(f"window has no {key!r}; it has {sorted(self.__dataclass_fields__)}")
        return getattr(self, key)


@dataclass(frozen=True)
class PieceInputs:
    """One call's tensors: ``logp`` a leaf with gradient, ``old_logp`` its detached copy, ``adv`` ``[b]``,
    ``mask`` ``[b, T]`` bool, and the ``window``."""

    logp: torch.Tensor
    old_logp: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor
    window: Window


def _check_int(name: str, value: object, low: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        want = f"an int >= {low}" + (" or None" if allow_none else "")
        raise TypeError(f"{name} must be {want}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def step_window(batch: Batch, split: Split, piece: Piece, max_tokens: int | None) -> Window:
    """The ``Window`` of ``piece``: the step's counts are the whole batch's."""
    micro_batches = max(p.micro_batch for p in split.pieces) + 1
    dp_size = max(p.rank for p in split.pieces) + 1
    return Window(num_tokens=int(batch.mask.sum()), num_seqs=int(batch.mask.shape[0]), micro_batches=micro_batches,
                  dp_size=dp_size, micro_batch=piece.micro_batch, rank=piece.rank, max_tokens=max_tokens)


def accumulate(batch: Batch, split: Split, run_piece: PieceFn, max_tokens: int | None) -> tuple[float, torch.Tensor]:
    """One optimizer step: ``run_piece`` on every piece, losses and gradients summed over micro-batches
    and averaged over ranks (what DDP and FSDP do). Returns the step's loss and its gradient ``[B, T]``."""
    dp_size = max(p.rank for p in split.pieces) + 1
    grad = torch.zeros_like(batch.logp)
    loss = 0.0
    for piece in split.pieces:
        rows = piece.rows
        leaf = batch.logp[rows].clone().requires_grad_(True)
        inputs = PieceInputs(logp=leaf, old_logp=batch.logp[rows].clone(), adv=batch.adv[rows].clone(),
                             mask=batch.mask[rows].clone(), window=step_window(batch, split, piece, max_tokens))
        piece_loss, piece_grad = run_piece(piece, inputs)
        loss += piece_loss / dp_size
        grad[rows] += piece_grad.to(grad.dtype) / dp_size
    return loss, grad


def _call_loss_fn(loss_fn: LossFn) -> PieceFn:
    def run_piece(piece: Piece, inputs: PieceInputs) -> tuple[float, torch.Tensor]:
        loss = loss_fn(inputs.logp, inputs.old_logp, inputs.adv, inputs.mask, inputs.window)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.dtype.is_floating_point:
            got = f"a {loss.dtype} tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) \
                else type(loss).__name__
            raise TypeError(f"loss_fn must return a 0-d floating tensor (one micro-batch's loss), got {got}")
        if not loss.requires_grad:
            raise ValueError("loss_fn returned a loss that does not depend on logp (requires_grad is False): the "
                             "audit differentiates it with respect to logp, the first argument")
        (grad,) = torch.autograd.grad(loss, inputs.logp, allow_unused=True)
        return float(loss.detach()), torch.zeros_like(inputs.logp) if grad is None else grad
    return run_piece


def _candidate_grad(batch: Batch, aggregation: str, max_tokens: int | None) -> torch.Tensor:
    """The gradient of ``rlloss.policy_loss`` under ``aggregation`` on the whole batch (on-policy PPO)."""
    leaf = batch.logp.clone().requires_grad_(True)
    loss = rlloss.policy_loss(leaf, batch.logp, batch.adv, batch.mask, aggregation=aggregation,
                              max_tokens=max_tokens if aggregation == "constant" else None, backend="torch").loss
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def _fit(g: torch.Tensor, c: torch.Tensor) -> tuple[float, float]:
    """Least-squares ``scale`` of ``c`` to ``g`` and the relative residual ``|g - scale*c| / |g|``."""
    cc = float((c * c).sum())  # not c @ c: this CPU build's fp64 dot is 100x slower than a product and a sum
    scale = float((g * c).sum()) / cc if cc > 0 else 0.0
    norm = float(g.norm())
    residual = float((g - scale * c).norm()) / norm if norm > 0 else math.inf
    return scale, residual


def _closeness(scale: float) -> float:
    """How far a scale is from 1, symmetric in 1/x (a zero scale is infinitely far)."""
    return abs(math.log(abs(scale))) if scale != 0 else math.inf


def _weights_by_length(grad: torch.Tensor, batch: Batch, sign: int) -> dict[int, float]:
    """``{length: mean over rows of that length with sign(A) == sign of mean_t(grad / -A)}``."""
    per_length: dict[int, list[float]] = {}
    for row in range(batch.mask.shape[0]):
        a = float(batch.adv[row])
        n = int(batch.mask[row].sum())
        if n == 0 or a == 0 or (a > 0) != (sign > 0):
            continue
        weight = float(grad[row][batch.mask[row]].mean()) / -a
        per_length.setdefault(n, []).append(weight)
    return {n: sum(w) / len(w) for n, w in sorted(per_length.items())}


def audit_steps(step: StepFn, *, micro_batches: int, dp_size: int, max_tokens: int | None, seed: int,
                longest: int | None = None, width: int | None = None, equal_rows: bool = False,
                label: str = "loss_fn") -> Audit:
    """The audit of a whole-step function: ``step(batch, split) -> (loss, gradient [B, T])``.

    ``audit_loss`` and the trainer front ends call this; ``longest`` is the longest probe row
    (default ``max_tokens``, else 48), ``width`` the padded ``T`` of every batch (None: each batch's
    longest row), ``equal_rows`` keeps every piece of a split at the same row count.
    """
    pieces = micro_batches * dp_size
    longest = longest if longest is not None else (max_tokens if max_tokens is not None else DEFAULT_MAX_LENGTH)
    batches = draw_batches(pieces, longest=longest, width=width, seed=seed)
    names = [n for n in AGGREGATIONS if n != "constant" or max_tokens is not None]
    steps: list[list[tuple[float, torch.Tensor]]] = []
    for k, batch in enumerate(batches):
        splits = make_splits(batch, micro_batches, dp_size, equal_rows=equal_rows, seed=seed + 1 + k)
        steps.append([step(batch, split) for split in splits])
    cand = {name: [_candidate_grad(b, name, max_tokens) for b in batches] for name in names}

    g = torch.cat([grad.flatten() for per_batch in steps for _, grad in per_batch])
    candidates = {}
    for name in names:
        c = torch.cat([cand[name][k].flatten() for k, per_batch in enumerate(steps) for _ in per_batch])
        candidates[name] = _fit(g, c)
    if float(g.norm()) > 0:
        best = min(residual for _, residual in candidates.values())
        tied = [n for n in names if candidates[n][1] <= best + TIE]
        nearest = min(tied, key=lambda n: _closeness(candidates[n][0]))
    else:
        nearest = None
    matched = nearest is not None and candidates[nearest][1] <= MATCH
    residual = candidates[nearest][1] if nearest is not None else math.inf

    split_error = 0.0
    for per_batch in steps:
        first = per_batch[0][1]
        for _, other in per_batch[1:]:
            diff = float((other - first).norm())
            base = float(first.norm())
            split_error = max(split_error, diff / base if base > 0 else (math.inf if diff > 0 else 0.0))
    by_batch = tuple(
        _fit(torch.cat([grad.flatten() for _, grad in per_batch]),
             torch.cat([cand[nearest][k].flatten() for _ in per_batch]))[0] if nearest is not None else math.nan
        for k, per_batch in enumerate(steps))

    loss0, grad0 = steps[0][0]
    return Audit(
        aggregation=nearest if matched else None,
        scale=candidates[nearest][0] if matched else None,
        residual=residual,
        split_invariant=split_error <= SPLIT_TOLERANCE,
        token_weight_by_length=_weights_by_length(grad0, batches[0], +1),
        loss_value=loss0,
        grad_norm=float(grad0.norm()),
        nearest=nearest,
        candidates=candidates,
        split_error=split_error,
        scale_by_batch=by_batch,
        token_weight_by_length_negative=_weights_by_length(grad0, batches[0], -1),
        candidate_weights={name: _weights_by_length(cand[name][0], batches[0], +1) for name in names},
        micro_batches=micro_batches,
        dp_size=dp_size,
        max_tokens=max_tokens,
        label=label,
    )


def audit_loss(loss_fn: LossFn, *, micro_batches: int = 1, dp_size: int = 1, max_tokens: int | None = None,
               seed: int = 0, equal_rows: bool = False) -> Audit:
    r"""Measure the objective that ``loss_fn`` optimises, and how it depends on the split of a step.

    ``loss_fn(logp, old_logp, adv, mask, window) -> Tensor`` is one micro-batch's loss exactly as a
    trainer computes it before ``backward()``: ``logp`` ``[b, T]`` fp64 with gradient, ``old_logp``
    equal to it and detached (on-policy: clips do not bind), ``adv`` ``[b]`` fp64, ``mask``
    ``[b, T]`` bool, ``window`` a ``Window`` of Python ints (the step's ``num_tokens`` and
    ``num_seqs``, ``micro_batches``, ``dp_size``, this call's ``micro_batch`` and ``rank``,
    ``max_tokens``). It returns a 0-d tensor.

    Method: three probe batches whose token and row counts differ (``rlloss.audit.probe``), each
    split four ways (even, random, lopsided, token-balanced; no piece without a token) into
    ``micro_batches * dp_size`` pieces; a step's gradient ``g`` is the pieces' gradients summed over
    micro-batches and averaged over ranks. For each aggregation ``c`` of ``policy_loss``
    (``token_mean``, ``seq_mean_token_mean``, ``seq_mean_token_sum``, ``token_sum``, and
    ``constant`` when ``max_tokens`` is given) the gradient ``g_c`` of the whole batch with its own
    counts, ``scale = <g, g_c> / <g_c, g_c>`` and ``residual = |g - scale * g_c| / |g|`` (L2 over all
    batches and splits). ``aggregation``: the smallest residual if at most 1e-3 (ties within 1e-6:
    the scale closest to 1), else None.

    Args:
        loss_fn: the trainer's loss of one micro-batch, as above.
        micro_batches: micro-batches per rank in one optimizer step (gradient accumulation), >= 1.
        dp_size: data-parallel ranks, >= 1 (the ranks' gradients are averaged).
        max_tokens: the generation budget: probe rows are at most this long and padded to it, and
            ``constant`` is a candidate; None: rows up to 48 tokens, each batch padded to its longest.
        seed: seeds the probe batches and splits.
        equal_rows: every piece of a split holds the same number of rows (a trainer whose
            micro-batches have a fixed row count, as TRL's); the splits still differ in tokens.

    Returns:
        an ``Audit``; ``report()`` says it in words, ``plot(path)`` draws the length weighting.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(logp, old_logp, adv, mask, window), "
                        f"got {type(loss_fn).__name__}")
    _check_int("micro_batches", micro_batches, 1)
    _check_int("dp_size", dp_size, 1)
    _check_int("max_tokens", max_tokens, 1, allow_none=True)
    _check_int("seed", seed, 0)
    if not isinstance(equal_rows, bool):
        raise TypeError(f"equal_rows must be a bool, got {type(equal_rows).__name__} {equal_rows!r}")
    run_piece = _call_loss_fn(loss_fn)
    label = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
    return audit_steps(lambda batch, split: accumulate(batch, split, run_piece, max_tokens),
                       micro_batches=micro_batches, dp_size=dp_size, max_tokens=max_tokens, seed=seed,
                       width=max_tokens, equal_rows=equal_rows, label=label)
