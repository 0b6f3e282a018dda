"""The synthetic batches an audit feeds a loss, and the ways it splits each one into pieces.

A probe batch is on-policy (``old_logp`` is ``logp``), so a clip never binds and the gradient of
every objective rlloss knows, in every token, is ``-A_i`` times the aggregation's weight of that
token: what is left to measure is the normaliser. Three batches whose token counts, row counts
and mean lengths differ tell the five aggregations apart (two batches with the same ratio of
tokens to rows would leave ``token_mean`` and ``seq_mean_token_sum`` indistinguishable up to a
scale); each is split into ``micro_batches * dp_size`` pieces in four ways whose pieces hold very
different token counts, so a normaliser that depends on how the step was split shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPE = torch.float64  # the audit measures the math, not the rounding of one dtype
DEFAULT_MAX_LENGTH = 48  # the longest probe row when the caller gives no max_tokens
SPLITS = ("even", "random", "lopsided", "token-balanced")


@dataclass(frozen=True)
class Batch:
    """One probe batch: ``logp`` ``[B, T]`` (fp64), ``adv`` ``[B]`` (fp64), ``mask`` ``[B, T]`` bool."""

    logp: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """Valid tokens of each row, ``[B]`` int64."""
        return self.mask.sum(-1)


@dataclass(frozen=True)
class Piece:
    """The rows (indices into the batch, ascending) that micro-batch ``micro_batch`` of rank ``rank`` holds."""

    micro_batch: int
    rank: int
    rows: torch.Tensor


@dataclass(frozen=True)
class Split:
    """One way of dividing a batch among the step's micro-batches and ranks; ``pieces`` in (rank, micro) order."""

    name: str
    pieces: tuple[Piece, ...]


def length_ladder(longest: int) -> list[int]:
    """About ten lengths from 1 to ``longest``, spaced geometrically (1, 2, 3, 5, 8, ... for 48)."""
    steps = 10
    ladder = {max(1, round(longest ** (k / (steps - 1)))) for k in range(steps)}
    return sorted(ladder | {1, longest})


def _rows_for(count: int, pieces: int) -> int:
    """The smallest multiple of ``pieces`` that is at least ``count``."""
    return pieces * math.ceil(count / pieces)


def draw_batches(pieces: int, *, longest: int, width: int | None, seed: int) -> list[Batch]:
    """The three probe batches of an audit whose steps have ``pieces`` pieces.

    Batch 0, the lengths batch: every length of ``length_ladder(longest)`` twice, the same log-probs
    once with an advantage ``+a`` and once with ``-a`` (``a`` drawn in [0.5, 1.5]), so the loss of
    any objective odd in ``A`` whose weights depend only on a row's length is 0 there while its
    gradient is not (``loss_value``), and
    ``token_weight_by_length`` reads one weight per length and sign. Batch 1: fewer, longer rows.
    Batch 2: more, shorter rows, one of them empty. Rows are a multiple of ``pieces`` so every split
    can give each piece the same number of rows, and at least 2 per piece so none is empty.
    ``width`` pads every batch to ``T = width`` (a generation budget); None pads each to its longest row.
    """
    g = torch.Generator().manual_seed(seed)
    ladder = length_ladder(longest)

    def uniform(n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=g, dtype=DTYPE)

    def lengths_between(n: int, low: int, high: int) -> list[int]:
        return torch.randint(low, high + 1, (n,), generator=g).tolist()

    # batch 0: +a and -a at every length, padded with more such pairs to a multiple of the pieces
    pairs = _rows_for(2 * max(len(ladder), pieces), math.lcm(pieces, 2)) // 2
    lengths0 = ladder + lengths_between(pairs - len(ladder), 1, longest)
    magnitude = uniform(pairs, 0.5, 1.5)
    batch0 = (lengths0 + lengths0, torch.cat([magnitude, -magnitude]))

    rows0 = 2 * pairs
    rows1 = max(_rows_for(rows0 // 2, pieces), 2 * pieces)
    if rows1 == rows0:
        rows1 += pieces
    lengths1 = lengths_between(rows1, max(1, longest // 2), longest)
    rows2 = _rows_for(rows0 + rows0 // 2 + 1, pieces)
    lengths2 = [0] + lengths_between(rows2 - 1, 1, max(1, longest // 4))
    drawn = [batch0]
    for lengths in (lengths1, lengths2):
        signs = torch.where(torch.rand(len(lengths), generator=g) < 0.5, -1.0, 1.0).to(DTYPE)
        drawn.append((lengths, signs * uniform(len(lengths), 0.3, 2.0)))

    batches = []
    for lengths, adv in drawn:
        lengths_t = torch.tensor(lengths)
        T = width if width is not None else int(lengths_t.max())
        mask = torch.arange(T)[None, :] < lengths_t[:, None]
        logp = -uniform(len(lengths) * T, 0.05, 3.0).reshape(len(lengths), T)
        if not batches:  # the lengths batch: each -a row is its +a row's twin, log-probs included
            logp[pairs:] = logp[:pairs]
        batches.append(Batch(logp=logp, adv=adv, mask=mask))
    return batches


def _chunks(order: list[int], sizes: list[int]) -> list[list[int]]:
    out, start = [], 0
    for size in sizes:
        out.append(order[start:start + size])
        start += size
    return out


def _balanced(order: list[int], lengths: list[int], parts: int, capacity: int | None) -> list[list[int]]:
    """Greedy: each row, longest first, to the part with the fewest tokens (and room, with ``capacity``)."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    tokens = [0] * parts
    for row in sorted(order, key=lambda r: -lengths[r]):
        open_parts = [p for p in range(parts) if capacity is None or len(groups[p]) < capacity]
        part = min(open_parts, key=lambda p: (tokens[p], len(groups[p]), p))
        groups[part].append(row)
        tokens[part] += lengths[row]
    return groups


def _random_sizes(rows: int, parts: int, g: torch.Generator) -> list[int]:
    """Random piece sizes, each at least 2 rows, summing to ``rows``."""
    extra = rows - 2 * parts
    cuts = sorted(torch.randint(0, extra + 1, (parts - 1,), generator=g).tolist())
    bounds = [0, *cuts, extra]
    return [2 + bounds[k + 1] - bounds[k] for k in range(parts)]


def _nonempty(groups: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """Give any piece without a valid token one from the piece with the most valid rows (a swap keeps sizes)."""
    for k, group in enumerate(groups):
        if any(lengths[r] > 0 for r in group):
            continue
        donor = max(range(len(groups)), key=lambda j: sum(lengths[r] > 0 for r in groups[j]))
        give = next(r for r in groups[donor] if lengths[r] > 0)
        take = group[0]
        groups[donor] = [take if r == give else r for r in groups[donor]]
        groups[k] = [give if r == take else r for r in group]
    return groups


def make_splits(batch: Batch, micro_batches: int, dp_size: int, *, equal_rows: bool, seed: int) -> list[Split]:
    """The four splits of ``batch`` into ``micro_batches * dp_size`` pieces, none without a valid token.

    ``even``: consecutive rows, equal counts. ``random``: a random permutation (and, unless
    ``equal_rows``, random piece sizes). ``lopsided``: rows sorted by length, longest first, so the
    first pieces hold most tokens (unless ``equal_rows``, every piece but the first holds 2 rows,
    the first all the rest). ``token-balanced``: pieces with about equal token counts (unless
    ``equal_rows``, of any row count). Piece ``k`` is micro-batch ``k % micro_batches`` of rank
    ``k // micro_batches``.
    """
    parts = micro_batches * dp_size
    rows = batch.mask.shape[0]
    lengths = batch.lengths.tolist()
    g = torch.Generator().manual_seed(seed)
    equal = [rows // parts] * parts
    permutation = torch.randperm(rows, generator=g).tolist()
    by_length = sorted(range(rows), key=lambda r: (-lengths[r], r))
    groups = {
        "even": _chunks(list(range(rows)), equal),
        "random": _chunks(permutation, equal if equal_rows else _random_sizes(rows, parts, g)),
        "lopsided": _chunks(by_length, equal if equal_rows else [rows - 2 * (parts - 1)] + [2] * (parts - 1)),
        "token-balanced": _balanced(list(range(rows)), lengths, parts, rows // parts if equal_rows else None),
    }
    splits = []
    for name in SPLITS:
        chosen = _nonempty([list(group) for group in groups[name]], lengths)
        pieces = tuple(Piece(micro_batch=k % micro_batches, rank=k // micro_batches,
                             rows=torch.tensor(sorted(group), dtype=torch.long)) for k, group in enumerate(chosen))
        splits.append(Split(name=name, pieces=pieces))
    return splits
