"""``Audit``, what an audit measured, in words (``report``) and as a figure (``plot``, matplotlib on first use)."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

MATCH = 1e-3  # the largest residual that still names an aggregation
TIE = 1e-6  # residuals closer than this are a tie, broken by the scale closest to 1
SPLIT_TOLERANCE = 1e-6  # relative L2 change between splits that still counts as split-invariant
EXACT = 1e-6  # a scale this close to 1 is 1

# each aggregation's objective, as SPEC.md writes it; N_tok, N_seq count the whole optimizer step
FORMULAS = {
    "token_mean": "sum_i sum_t l_it*M_it / N_tok",
    "seq_mean_token_mean": "sum_i (sum_t l_it*M_it / n_i) / N_seq",
    "seq_mean_token_sum": "sum_i sum_t l_it*M_it / N_seq",
    "constant": "sum_i sum_t l_it*M_it / (N_seq * {max_tokens})",
    "token_sum": "sum_i sum_t l_it*M_it",
}
RECIPES = {"token_mean": "DAPO, BNPO", "seq_mean_token_mean": "GRPO as published",
           "seq_mean_token_sum": "LUSPO", "constant": "Dr. GRPO", "token_sum": "verl token-sum"}
# each aggregation's curve in the plot: (line style, colour)
CURVE_STYLES = {"token_mean": ("-", "tab:green"), "seq_mean_token_mean": ("--", "tab:orange"),
                "seq_mean_token_sum": ("-.", "tab:purple"), "constant": (":", "tab:brown"),
                "token_sum": ((0, (3, 1, 1, 1, 1, 1)), "tab:gray")}


def _formula(name: str, max_tokens: int | None) -> str:
    return FORMULAS[name].format(max_tokens=max_tokens)


def _call(name: str, max_tokens: int | None) -> str:
    extra = f", max_tokens={max_tokens}" if name == "constant" else ""
    return (f'rlloss.policy_loss(logp, old_logp, adv, mask, aggregation="{name}"{extra}, '
            "**rlloss.distributed.step_counts(masks).kwargs())")


def _num(x: float) -> str:
    return f"{x:.4g}" if x == x and abs(x) != math.inf else str(x)


def small(x: float) -> str:
    """A residual or relative change: below 1e-12 it is rounding (and differs between CPUs), so said as such."""
    return "< 1e-12" if x < 1e-12 else f"{x:.1e}"


def _scale_reason(scale: float, micro_batches: int, dp_size: int) -> str:
    """A name for a scale that is a simple function of the step's shape, or ''."""
    known = []
    if micro_batches > 1:
        known += [(1 / micro_batches, "1/micro_batches: divided by the accumulation steps once too often"),
                  (micro_batches, "micro_batches: the division by the accumulation steps is missing")]
    if dp_size > 1:
        known += [(1 / dp_size, "1/dp_size: the ranks' averaging is not compensated"),
                  (dp_size, "dp_size: the ranks' averaging is compensated twice")]
    if micro_batches > 1 and dp_size > 1:
        known += [(1 / (micro_batches * dp_size), "1/(micro_batches*dp_size)")]
    for value, reason in known:
        if abs(scale / value - 1) <= EXACT:
            return f" (= {reason})"
    return ""


def _length_exponent(weights: dict[int, float]) -> float | None:
    """The least-squares slope of log(weight) against log(length): weight ~ length**exponent."""
    points = [(math.log(n), math.log(w)) for n, w in weights.items() if w > 0]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx > 0 else None


def departures(audit: Audit) -> list[str]:
    """Each way the measured objective departs from an exact, split-invariant aggregation, one line each."""
    lines = []
    if audit.nearest is None:
        return ["the loss has no gradient in logp on the probe: nothing is trained"]
    scale, residual = audit.candidates[audit.nearest]
    if audit.aggregation is None:
        spread = ", ".join(_num(s) for s in audit.scale_by_batch)
        lines.append(f"no aggregation matches: the nearest is {audit.nearest} at scale {_num(scale)} with "
                     f"residual {_num(residual)} (scale per probe batch: {spread})")
    elif scale < 0:
        lines.append(f"scale {_num(scale)}: the sign is flipped, the step ascends the objective")
    elif abs(scale - 1) > EXACT:
        lines.append(f"scale {_num(scale)}: the step gradient is {_num(scale)} x {audit.aggregation}'s"
                     + _scale_reason(scale, audit.micro_batches, audit.dp_size))
    if not audit.split_invariant:
        lines.append(f"not split-invariant: the step gradient changes by up to {_num(audit.split_error)} (relative "
                     "L2) between splits of the same batch: a token's weight depends on which micro-batch or rank "
                     "holds it")
    pos, neg = audit.token_weight_by_length, audit.token_weight_by_length_negative
    common = [n for n in pos if n in neg and pos[n] != 0]
    if common:
        worst = max(abs(neg[n] / pos[n] - 1) for n in common)
        if worst > 1e-6:
            lines.append(f"asymmetric: a token with A < 0 weighs up to {_num(worst)} (relative) more or less than "
                         "one with A > 0 of the same length")
    return lines


def format_report(audit: Audit) -> str:
    """The audit as plain text: what was measured, the objective, the rlloss call, departures, length weighting."""
    shape = (f"{audit.micro_batches} micro-batch(es) x {audit.dp_size} rank(s) per optimizer step, "
             f"max_tokens={audit.max_tokens}")
    lines = [f"audit of {audit.label}", f"  step: {shape}; 3 probe batches x 4 splits, on-policy"]
    if audit.nearest is None:
        lines.append("  effective objective: none (zero gradient)")
    elif audit.aggregation is not None:
        scale = audit.scale
        factor = "" if abs(scale - 1) <= EXACT else f"{_num(scale)} * "
        lines.append(f"  effective objective: {factor}{_formula(audit.aggregation, audit.max_tokens)}   "
                     f"[{audit.aggregation}: {RECIPES[audit.aggregation]}]")
        call = _call(audit.aggregation, audit.max_tokens)
        lines.append(f"  rlloss call: {call}" + ("" if not factor else f"  times {_num(scale)}"))
        lines.append(f"  scale {_num(scale)}, residual {small(audit.residual)}")
    else:
        lines.append(f"  effective objective: none of rlloss's aggregations (nearest {audit.nearest}: "
                     f"{_formula(audit.nearest, audit.max_tokens)}, residual {_num(audit.residual)})")
    invariant = "yes" if audit.split_invariant else "NO"
    lines.append(f"  split-invariant: {invariant} (largest change between splits {small(audit.split_error)}, "
                 f"tolerance {SPLIT_TOLERANCE:.0e})")
    found = departures(audit)
    lines.append("  departures: " + ("none" if not found else ""))
    lines += [f"    - {line}" for line in found]
    weights = audit.token_weight_by_length
    exponent = _length_exponent(weights)
    if weights:
        shown = ", ".join(f"{n}: {w:.3g}" for n, w in weights.items())
        trend = "" if exponent is None else f"; weight ~ length^{round(exponent, 2) + 0.0:+.2f}"  # never "-0.00"
        lines.append(f"  token weight by length (A > 0; first batch, even split){trend}: {shown}")
    value = "0" if abs(audit.loss_value) < 1e-12 else f"{audit.loss_value:.3g}"
    lines.append(f"  loss 0 is not gradient 0: on the first probe batch (+A and -A at every length) the step's loss "
                 f"is {value} and its gradient norm {audit.grad_norm:.3g}")
    return "\n".join(_wrapped(line) for line in lines)


REPORT_WIDTH = 79  # a terminal's, and what a code block of the documentation shows uncut


def _wrapped(line: str) -> str:
    """A report line folded at ``REPORT_WIDTH`` columns, its continuations indented under it."""
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return textwrap.fill(line, REPORT_WIDTH, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def plot_audit(audit: Audit, path: Path) -> Path:
    """Token weight against row length, log-log: the five aggregations' curves and the trainer's points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, weights in audit.candidate_weights.items():
        lengths = list(weights)
        style, colour = CURVE_STYLES[name]
        ax.plot(lengths, [weights[n] for n in lengths], linestyle=style, color=colour, linewidth=1.4,
                label=f"{name}, scale 1")
    pos, neg = audit.token_weight_by_length, audit.token_weight_by_length_negative
    ax.plot(list(pos), [abs(w) for w in pos.values()], "o", color="black", markersize=6, label="measured, A > 0")
    ax.plot(list(neg), [abs(w) for w in neg.values()], "x", color="tab:red", markersize=8, label="measured, A < 0")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("row length (valid tokens)")
    ax.set_ylabel("|weight of one token| (step gradient / -A)")
    verdict = (f"{audit.aggregation}, scale {_num(audit.scale)}" if audit.aggregation is not None
               else f"no match (nearest {audit.nearest})")
    verdict += "" if audit.split_invariant else ", not split-invariant"
    ax.set_title("\n".join(textwrap.wrap(audit.label, 90) + [verdict]), fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", metadata={"Software": None})
    return path


@dataclass(frozen=True)
class Audit:
    """What one loss optimises, measured: the fields of ``audit_loss``'s contract, then the detail.

    Contract fields: ``aggregation`` (the rlloss aggregation whose gradient the step's matches,
    ``residual <= 1e-3``, or None), ``scale`` (the step gradient over that aggregation's: 1.0 when
    exact; None without a match), ``residual`` (``|g - scale*g_c| / |g|`` of the match, or of the
    nearest aggregation), ``split_invariant`` (every split of a batch gives the same step gradient,
    relative 1e-6), ``token_weight_by_length`` (``{length: weight}`` on the first probe batch's even
    split: the step gradient of a token over ``-A``, averaged over the rows of that length with
    ``A > 0``), ``loss_value`` and ``grad_norm`` (the step's loss and its gradient's L2 norm there,
    where the ``+A``/``-A`` twins make the loss of any length-weighted objective 0).

    Detail: ``nearest`` (the aggregation of smallest residual, None for a zero gradient),
    ``candidates`` (``{name: (scale, residual)}``), ``split_error`` (the largest relative L2 change of
    a step gradient between splits of one batch), ``scale_by_batch`` (the nearest aggregation's
    least-squares scale on each probe batch), ``token_weight_by_length_negative`` (rows with
    ``A < 0``), ``candidate_weights`` (each aggregation's own token weight by length on the same
    batch, for ``plot``), the step's shape and ``label`` (what was audited).
    """

    aggregation: str | None
    scale: float | None
    residual: float
    split_invariant: bool
    token_weight_by_length: dict[int, float]
    loss_value: float
    grad_norm: float
    nearest: str | None
    candidates: dict[str, tuple[float, float]]
    split_error: float
    scale_by_batch: tuple[float, ...]
    token_weight_by_length_negative: dict[int, float]
    candidate_weights: dict[str, dict[int, float]] = field(repr=False)
    micro_batches: int
    dp_size: int
    max_tokens: int | None
    label: str = "loss_fn"

    def report(self) -> str:
        """Plain text: the effective objective as a formula, the matching rlloss call, one line per departure."""
        return format_report(self)

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of token weight against row length: the trainer's beside the five aggregations'.

        matplotlib is imported here, on first use. Returns the path written.
        """
        return plot_audit(self, Path(path))
