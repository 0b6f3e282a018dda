"""The memory plot of a benchmark record: peak extra memory of one forward+backward against tokens.

``bench_loss.py`` plots time; this draws the same panels (each recipe as published, per dtype)
for the memory its JSON record already holds (``peak_extra_bytes``, from the profiler's memory
events on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA), so the figure needs no new run::

    python benchmarks/plot_memory.py                                   # the committed CPU record
    python benchmarks/plot_memory.py benchmarks/results/bench-cuda.json

It writes ``<record>-memory.png`` beside the record (``bench-cpu-memory.png``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import plots  # noqa: E402

from rlloss.recipes import RECIPES  # noqa: E402

# Each recipe as published: with its KL term only if its preset has one (GRPO).
PUBLISHED_KL = {recipe.name: recipe.beta != 0 for recipe in RECIPES.values()}


def panels(rows: list[dict]) -> list[list[plots.Panel]]:
    """One row of panels per dtype, one panel per recipe, one line per contender: (tokens, MiB)."""
    recipes = list(dict.fromkeys(row["recipe"] for row in rows))
    contenders = list(dict.fromkeys(row["contender"] for row in rows))
    grid = []
    for dtype in sorted({row["dtype"] for row in rows}):
        line = []
        for recipe in recipes:
            kl = PUBLISHED_KL[recipe]
            lines = {name: [(row["tokens"], row["peak_extra_bytes"] / 2**20) for row in rows
                            if (row["contender"], row["recipe"], row["kl"], row["dtype"]) == (name, recipe, kl, dtype)
                            and row["peak_extra_bytes"] > 0]  # a log scale: a zero reading has no point
                     for name in contenders}
            line.append((f"{recipe} {'+KL ' if kl else ''}{dtype}", lines))
        grid.append(line)
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("record", type=Path, nargs="?", default=HERE / "results" / "bench-cpu.json")
    args = parser.parse_args(argv)
    record = json.loads(args.record.read_text(encoding="utf-8"))
    env = record["environment"]
    png = args.record.with_name(args.record.stem + "-memory.png")
    kind = env["kind"].split(" (")[0]  # "measured on CPU": the clock in parentheses timed the other plot
    title = f"rlloss policy loss, peak extra memory of fwd+bwd, {kind}, {env['device']}, {env['date'][:10]}"
    if not plots.plot_grid(panels(record["rows"]), png, title, "tokens (B x T)", "peak extra MiB"):
        print("no plot: matplotlib is missing (pip install -e \".[dev]\")", file=sys.stderr)
        return 1
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
