"""How far repeated timings spread, what that leaves of a ratio, and when a machine is too noisy.

A leaf: the standard library only. Every timed figure of the benchmark is a median of ``n`` runs
with its spread: the quartiles ``q1``, ``q3`` (the interquartile range, IQR, holds the middle
half of the runs) and the extremes ``min``, ``max``.

A ratio of two timed figures ``a / b`` (a speed-up: the peer's time over rlloss's) carries the
range its middle halves allow::

    ratio = median(a) / median(b),  low = q1(a) / q3(b),  high = q3(a) / q1(b)

Too noisy, defined from the spread:

* a ratio is *too noisy to mean anything* when ``high / low > NOISY_RATIO`` (1.5): its middle
  halves leave it uncertain by more than a factor 1.5, about 22% either side of the median, which
  is what two figures whose IQRs are each a fifth of their medians give. Below that, a ratio of 2
  cannot be read as 1 (its low end stays above 1.33), nor a ratio of 1 as 1.5.
* one timed figure is *noisy* when its IQR is more than ``NOISY_IQR`` (20%) of its median.
* a run warns when any ratio it summarises is too noisy (``noisy_warning``); rerunning on a quieter
  machine, or with more repetitions (``--reps``), narrows the spread.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

NOISY_RATIO = 1.5  # high / low of a ratio's range above which the ratio means nothing
NOISY_IQR = 0.2  # IQR / median of one figure above which it is flagged


@dataclasses.dataclass(frozen=True)
class Spread:
    """Order statistics of repeated timings (ms): median, quartiles, extremes and the count."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @staticmethod
    def of(samples: Sequence[float]) -> Spread:
        """The spread of ``samples`` (at least one); quartiles by the inclusive method (they stay
        within ``[min, max]``; one sample gives zero spread)."""
        if not samples:
            raise ValueError("Spread.of needs at least one sample, got none")
        xs = sorted(float(x) for x in samples)
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
        return Spread(statistics.median(xs), q1, q3, xs[0], xs[-1], len(xs))

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Spread:
        return Spread(**{f.name: d[f.name] for f in dataclasses.fields(Spread)})

    @property
    def rel_iqr(self) -> float:
        """IQR over the median: 0.1 means the middle half of the runs spans 10% of the median."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        return self.rel_iqr > NOISY_IQR

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Ratio:
    """``a / b`` of two timed figures, with the range their middle halves allow (see the module)."""

    median: float
    low: float
    high: float
    runs: int = 2  # the fewer runs of the two figures: one run has no spread

    @staticmethod
    def of(a: Spread, b: Spread) -> Ratio:
        return Ratio(a.median / b.median, a.q1 / b.q3, a.q3 / b.q1 if b.q1 > 0 else float("inf"), min(a.n, b.n))

    @property
    def width(self) -> float:
        """high / low: 1 for exact figures; the factor the ratio is uncertain by."""
        return self.high / self.low if self.low > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        return self.width > NOISY_RATIO

    def __str__(self) -> str:
        if self.runs < 2:
            return f"{self.median:.2f}x (1 run)"
        return f"{self.median:.2f}x [{self.low:.2f}-{self.high:.2f}]" + ("?" if self.noisy else "")


def noisy_warning(ratios: Iterable[Ratio], what: str = "ratios") -> str | None:
    """A warning when any of ``ratios`` is too noisy to mean anything or rests on one run, else None."""
    ratios = list(ratios)
    bad = [r for r in ratios if r.noisy]
    single = [r for r in ratios if r.runs < 2]
    lines = []
    if bad:
        lines.append(f"WARNING: {len(bad)} of {len(ratios)} {what} (marked ?) have a range wider than a factor "
                     f"{NOISY_RATIO:g} (widest {max(r.width for r in bad):.1f}): this machine was too noisy for them "
                     "to mean anything. Rerun on a quieter machine or with more --reps.")
    if single:
        lines.append(f"WARNING: {len(single)} of {len(ratios)} {what} rest on one run each: no spread to judge "
                     "them by.")
    return "\n".join(lines) or None
