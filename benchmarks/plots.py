"""The benchmark's figure, drawn from its JSON record: one panel per part of the report.

Panels, each titled with the kind of its figures (measured, counted, modelled):

* time: the policy loss's forward+backward median per contender, per recipe as published and
  dtype, at the largest size measured; the bars' whiskers are the quartiles.
* time against tokens: the same medians at every size the run measured, fp32, with the quartiles.
* memory: the policy loss's peak extra memory of one forward+backward, as the time panel.
* counted traffic: bytes moved per backend over the least any backend can move, per recipe and dtype.
* from logits: forward+backward median per contender (quartiles), its peak extra memory written above.
* from hidden states: the measured medians at the measured size and the modelled H100 times at
  the counted sizes, for whatever contenders the record holds; any other ``*_ms`` figure the record
  keeps per size (a bound, say) is drawn as a labelled line over that group.

Time and memory axes are logarithmic, ticked at 1-2-5 steps in plain numbers. A pure function of
the record: ``python benchmarks/plots.py RECORD.json OUT.png`` redraws a committed record.
``plot_grid`` draws log-log line panels the same way (``plot_memory.py``'s memory against tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TOTAL = "fwd+bwd"
Panel = tuple[str, dict[str, list[tuple[float, float]]]]  # a title, and (x, y) points per line label
PANELS = ("time", "time against tokens", "memory", "counted traffic", "from logits", "from hidden states")


def _plain(x: float, _pos: Any = None) -> str:
    """A tick label without exponents: 0.05, 2, 300, 20k, 1M."""
    if x <= 0:
        return ""
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if x >= size:
            return f"{x / size:g}{suffix}"
    return f"{x:g}"


def _log_axis(axis: Any) -> None:
    """A log axis ticked at 1, 2, 5 per decade, labelled in plain numbers; minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=30))
    axis.set_major_formatter(FuncFormatter(_plain))
    axis.set_minor_formatter(NullFormatter())


def _thin_log_ticks(ax: Any, which: str = "y") -> None:
    """Keep 1-2-5 ticks where the axis spans little, only the decades where it spans much."""
    from matplotlib.ticker import LogLocator

    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    if lo > 0 and hi / lo > 1e3:
        (ax.yaxis if which == "y" else ax.xaxis).set_major_locator(LogLocator(base=10, numticks=30))


def _spread(row: Mapping[str, Any]) -> tuple[float, float, float]:
    """(median, q1, q3) of a row's total time; the median alone for a record without a spread."""
    s = row.get("spread", {})
    s = s.get(TOTAL, s)
    ms = row["ms"][TOTAL] if isinstance(row["ms"], Mapping) else row["ms"]
    return ms, s.get("q1", ms), s.get("q3", ms)


def _bars(ax: Any, groups: Sequence[str], series: Mapping[str, Sequence[float | None]],
          errors: Mapping[str, Sequence[tuple[float, float] | None]] | None = None,
          colors: Mapping[str, Any] | None = None, notes: Mapping[str, Sequence[str]] | None = None,
          note_rotation: float = 90) -> None:
    """Grouped bars: a group per label of ``groups``, a bar per series (None: no bar)."""
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        pts = [(x, v, (errors or {}).get(name, [None] * len(values))[j], (notes or {}).get(name, [""] * len(values))[j])
               for j, (x, v) in enumerate(zip(xs, values)) if v is not None and v > 0]
        if not pts:
            continue
        x, v, err, note = zip(*pts)
        ax.bar(x, v, width, label=name, color=(colors or {}).get(name))
        if any(e is not None for e in err):
            lo = [max(val - (e or (val, val))[0], 0) for val, e in zip(v, err)]
            hi = [max((e or (val, val))[1] - val, 0) for val, e in zip(v, err)]
            ax.errorbar(x, v, yerr=[lo, hi], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        for xi, vi, e, text in zip(x, v, err, note):
            if text:  # above the bar, or above its whisker
                ax.annotate(text, (xi, max(vi, (e or (vi, vi))[1])), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=6, rotation=note_rotation)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(groups) - 0.4)


def _colors(record: Mapping[str, Any]) -> dict[str, Any]:
    """One colour per contender name across every panel, in the order the record first names them."""
    import matplotlib

    hidden = record.get("hidden") or {}
    names = [r["contender"] for r in record.get("rows", [])]
    names += [r["backend"] for r in (record.get("model") or {}).get("rows", [])]
    names += [r["contender"] for r in record.get("logits_rows", [])]
    names += list(hidden.get("measured", {}))
    names += [k for per_n in hidden.get("counted_and_model", {}).values() for k, v in per_n.items()
              if isinstance(v, Mapping)]
    palette = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["Set2"].colors)
    return {n: palette[i % len(palette)] for i, n in enumerate(dict.fromkeys(names))}


def _policy_cases(record: Mapping[str, Any], published_kl: Mapping[str, bool]) -> tuple[list[str], dict]:
    rows = [r for r in record.get("rows", []) if r["kl"] == published_kl.get(r["recipe"], r["kl"])]
    cases: dict[str, dict[str, Mapping[str, Any]]] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            here = [r for r in rows if (r["recipe"], r["dtype"]) == (recipe, dtype)]
            if here:
                big = max(r["b"] * r["t"] for r in here)
                label = f"{recipe}{' +KL' if here[0]['kl'] else ''} {dtype}"
                cases[label] = {r["contender"]: r for r in here if r["b"] * r["t"] == big}
    names = list(dict.fromkeys(r["contender"] for r in rows))
    return names, cases


def _time_and_memory(axes: Sequence[Any], record: Mapping[str, Any], published_kl: Mapping[str, bool],
                     colors: Mapping[str, Any], kind: str) -> None:
    names, cases = _policy_cases(record, published_kl)
    groups = list(cases)
    size = next((f"{r['b']}x{r['t']}" for c in cases.values() for r in c.values()), "")
    time_ax, scale_ax, mem_ax = axes
    med = {n: [(_spread(cases[g][n])[0] if n in cases[g] else None) for g in groups] for n in names}
    err = {n: [(_spread(cases[g][n])[1:] if n in cases[g] else None) for g in groups] for n in names}
    _bars(time_ax, groups, med, err, colors)
    time_ax.set_title(f"time: policy loss at {size}, {kind}", fontsize=9)
    time_ax.set_ylabel("forward+backward ms (median, quartiles)", fontsize=8)
    mem = {n: [(cases[g][n]["peak_extra_bytes"] / 2**20 if n in cases[g] else None) for g in groups] for n in names}
    _bars(mem_ax, groups, mem, None, colors)
    mem_ax.set_title(f"memory: policy loss at {size}, {kind}", fontsize=9)
    mem_ax.set_ylabel("peak extra MiB of one forward+backward", fontsize=8)

    rows = [r for r in record.get("rows", []) if r["kl"] == published_kl.get(r["recipe"], r["kl"])]
    dtype = "fp32" if any(r["dtype"] == "fp32" for r in rows) else next((r["dtype"] for r in rows), "")
    styles = ("-", "--", ":", "-.")
    for i, recipe in enumerate(dict.fromkeys(r["recipe"] for r in rows)):
        for n in names:
            pts = sorted((r["b"] * r["t"], *_spread(r)) for r in rows
                         if (r["recipe"], r["dtype"], r["contender"]) == (recipe, dtype, n))
            if pts:
                x, m, lo, hi = zip(*pts)
                scale_ax.errorbar(x, m, yerr=[[a - b for a, b in zip(m, lo)], [b - a for a, b in zip(m, hi)]],
                                  color=colors[n], linestyle=styles[i % len(styles)], marker="o", markersize=3,
                                  capsize=2, label=f"{n}, {recipe}")
    scale_ax.set_xscale("log")
    _log_axis(scale_ax.xaxis)
    n_sizes = len({r["b"] * r["t"] for r in rows})
    scale_ax.set_title(f"time against tokens: policy loss {dtype}, {n_sizes} sizes, {kind}", fontsize=9)
    scale_ax.set_xlabel("tokens (B x T)", fontsize=8)
    scale_ax.set_ylabel("forward+backward ms", fontsize=8)
    scale_ax.legend(fontsize=6, ncol=1, loc="best")


def _traffic(ax: Any, record: Mapping[str, Any], colors: Mapping[str, Any]) -> None:
    model = record.get("model") or {}
    rows = model.get("rows", [])
    if not rows:
        ax.set_title("counted traffic: not in this run (--skip-model)", fontsize=9)
        return
    groups = list(dict.fromkeys(f"{r['recipe']} {r['dtype']}" for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    at = {(f"{r['recipe']} {r['dtype']}", r["backend"]): r for r in rows}
    series = {b: [(at[g, b]["bytes"] / at[g, b]["minimum_bytes"] if (g, b) in at else None) for g in groups]
              for b in backends}
    notes = {b: [(f"{at[g, b]['launches']}" if (g, b) in at else "") for g in groups] for b in backends}
    _bars(ax, groups, series, None, colors, notes)
    ax.legend(fontsize=6, loc="upper left")
    b, t = model.get("size", ("?", "?"))
    ax.set_title(f"counted traffic: bytes / minimum at {b}x{t} (launches above)", fontsize=9)
    ax.set_ylabel("x minimum bytes", fontsize=8)


def _logits(ax: Any, record: Mapping[str, Any], colors: Mapping[str, Any], kind: str) -> None:
    rows = record.get("logits_rows", [])
    if not rows:
        ax.set_title("from logits: not in this run", fontsize=9)
        return
    groups = list(dict.fromkeys(f"{r['tokens']} tokens, V={r['vocab']}" for r in rows))
    names = list(dict.fromkeys(r["contender"] for r in rows))
    at = {(f"{r['tokens']} tokens, V={r['vocab']}", r["contender"]): r for r in rows}
    med = {n: [(_spread(at[g, n])[0] if (g, n) in at else None) for g in groups] for n in names}
    err = {n: [(_spread(at[g, n])[1:] if (g, n) in at else None) for g in groups] for n in names}
    notes = {n: [(f"{at[g, n]['peak_extra_bytes'] / 2**20:.0f} MiB" if (g, n) in at else "") for g in groups]
             for n in names}
    _bars(ax, groups, med, err, colors, notes, note_rotation=0)
    ax.legend(fontsize=6, loc="upper right")
    ax.set_title(f"from logits: bf16 logits, DAPO, {kind}", fontsize=9)
    ax.set_ylabel("forward+backward ms (peak extra above)", fontsize=8)


def _hidden(ax: Any, record: Mapping[str, Any], colors: Mapping[str, Any], kind: str) -> None:
    hidden = record.get("hidden")
    if not hidden:
        ax.set_title("from hidden states: not in this run (--skip-hidden)", fontsize=9)
        return
    measured = {n: m for n, m in hidden.get("measured", {}).items() if isinstance(m, Mapping) and "ms" in m}
    modelled = hidden.get("counted_and_model", {})
    names = list(dict.fromkeys([*measured, *(k for per_n in modelled.values() for k, v in per_n.items()
                                             if isinstance(v, Mapping) and "model_ms" in v)]))
    size = hidden.get("measured_size", {})
    groups = [f"{hidden.get('measured_kind', kind)}\nN={size.get('N', '?')} V={size.get('V', '?')}"]
    model_v = hidden.get("model", {}).get("V", "?")
    groups += [f"modelled H100\nN={n} V={model_v}" for n in modelled]
    med = {n: [measured[n]["ms"] if n in measured else None] for n in names}
    err = {n: [_spread(measured[n])[1:] if n in measured else None] for n in names}
    for per_n in modelled.values():
        for n in names:
            v = per_n.get(n)
            med[n].append(v["model_ms"] if isinstance(v, Mapping) and "model_ms" in v else None)
            err[n].append(None)
    _bars(ax, groups, med, err, colors)
    for g, per_n in enumerate(modelled.values(), start=1):  # any other figure in ms kept per size: a line
        for key, value in per_n.items():
            if key.endswith("_ms") and isinstance(value, (int, float)) and value > 0:
                ax.hlines(value, g - 0.45, g + 0.45, colors="black", linestyles="dashed", linewidth=0.8)
                ax.annotate(key.removesuffix("_ms"), (g + 0.45, value), fontsize=6, ha="right", va="bottom")
    ax.set_xticklabels(groups, rotation=0, ha="center", fontsize=7)
    skipped = [f"{n} ({m['skipped'].split(';')[0]})" for n, m in hidden.get("measured", {}).items()
               if isinstance(m, Mapping) and "skipped" in m]
    if skipped:
        ax.set_xlabel("not measured here: " + ", ".join(skipped), fontsize=7)
    ax.set_title("from hidden states: fwd+bwd, bf16, measured and modelled", fontsize=9)
    ax.set_ylabel("ms (measured: median, quartiles)", fontsize=8)
    ax.legend(fontsize=6, ncol=4, loc="upper left")


def figure(record: Mapping[str, Any], published_kl: Mapping[str, bool], title: str = "") -> Any:
    """The figure: a panel per part (``PANELS``), each titled with what its figures are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = "measured " + ("CUDA" if "CUDA" in record.get("environment", {}).get("kind", "") else "CPU")
    fig, grid = plt.subplots(2, 3, figsize=(18, 10.5), layout="constrained")
    axes = dict(zip(PANELS, grid.flat))
    colors = _colors(record)
    _time_and_memory([axes["time"], axes["time against tokens"], axes["memory"]], record, published_kl, colors, kind)
    _traffic(axes["counted traffic"], record, colors)
    _logits(axes["from logits"], record, colors, kind)
    _hidden(axes["from hidden states"], record, colors, kind)
    for name, ax in axes.items():
        if ax.has_data():
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi * (hi / lo) ** 0.4)  # room above the tallest bar for the legend and the notes
            _log_axis(ax.yaxis)
            _thin_log_ticks(ax)
            ax.grid(True, axis="y", which="major", alpha=0.3)
        ax.tick_params(labelsize=7)
    axes["time"].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def draw(record: Mapping[str, Any], published_kl: Mapping[str, bool], path: Path, title: str = "") -> bool:
    """Write the figure to ``path``; False (nothing written) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    import matplotlib.pyplot as plt

    fig = figure(record, published_kl, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_grid(grid: Sequence[Sequence[Panel]], path: Path, title: str, xlabel: str, ylabel: str) -> bool:
    """Log-log line plots, a panel per cell of ``grid``, ticked as the figure is, the legend in the
    first; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows, cols = len(grid), max(len(row) for row in grid)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    for i, row in enumerate(grid):
        for j, (panel_title, lines) in enumerate(row):
            ax = axes[i][j]
            for label, points in lines.items():
                if points:
                    ax.plot(*zip(*sorted(points)), marker="o", label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            _log_axis(ax.xaxis)
            _log_axis(ax.yaxis)
            _thin_log_ticks(ax)
            ax.set_title(panel_title, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="major", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Redraw a record: ``python benchmarks/plots.py RECORD.json OUT.png``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("record", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    record = json.loads(args.record.read_text())
    draw(record, record.get("published_kl", {}), args.out, record.get("title", ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

