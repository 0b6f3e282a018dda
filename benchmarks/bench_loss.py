"""Time and memory of the per-token policy loss, forward and backward, per contender.

Contenders (``CONTENDERS``), on the same inputs in one run:

* ``trl-inline``: TRL's GRPO loss arithmetic written inline in eager PyTorch (``loss_type`` grpo,
  dapo, dr_grpo; the formulas, not an import of TRL): the peer, the baseline most trainers run today.
* ``rlloss-torch``: ``rlloss.policy_loss(backend="torch")``, the eager reference.
* ``rlloss-compile``: the same reference under ``torch.compile``.
* ``rlloss-triton``: the fused kernels, on a CUDA device only (skipped on the CPU with the reason
  printed: interpreter timings measure Python, not a kernel).

Each timed figure is the median of ``--reps`` training steps or more after warm-up, with its
quartiles (``harness.measure_together``): each step is timed as its forward and then the backward
of that forward's loss, and its total is their sum, so the total is never below its parts; the
contenders of a case take turns step by step, so the machine's load falls on all alike.
``x trl-inline`` is the peer's total over the contender's, with the range the quartiles allow
(``spread.Ratio``); ``?`` marks a figure or ratio too noisy to mean anything (``spread.py``
defines it) and the run ends with a warning when a summarised ratio is. On the CPU, times are
``time.perf_counter``, the policy loss's on one thread by default (``--threads``), and peak extra
memory comes from the profiler's memory events (allocations minus frees during forward+backward).
On a CUDA device the same command times with CUDA events, reads ``torch.cuda.max_memory_allocated``
and sweeps larger sizes. Results: aligned tables on stdout, a one-screen summary at the end
(``summary.py``: per recipe, rlloss against the best peer), ``benchmarks/results/bench-<device>.json``
(``-quick`` unless ``--full``) and a PNG figure of every part beside it (``plots.py``).

Why the policy loss is timed on one thread on the CPU by default: its ops take microseconds to a
few milliseconds, and on a shared 2-core machine torch's second intra-op thread waits for a core
another process holds, a wait longer than the op. Measured on this project's 2-core machine with
other jobs running, 15 steps each: with 2 threads the forward at 16x1024 took 7.4 or 15.2 ms in
nearly every step (0.15 to 1.3 ms on one thread) while the backward took 0.5 to 0.8 ms either
way, and the totals' IQR was 76% of their median over 16 cases (16% on one thread). Timed in
separate calls, as this script did before, those stalls landed in some phases and not others: rows
such as fwd 12.8 ms, bwd 0.77, f+b 1.81 (the issue's: 14.8, 0.57, 1.26). ``--threads 0`` keeps
torch's default. The from-logits and from-hidden-states problems, whose ops take milliseconds to
seconds, run on torch's default threads (every core), where a wait for a core is small beside an op.

Then the other parts of the report, each a module registered in ``PARTS``: launches and bytes
counted for forward+backward and an H100 roofline model built from them (``roofline.py``,
labelled as a model), the from-logits problem (``bench_logits.py``) and the loss from hidden
states (``bench_hidden.py``: measured on the CPU at a small size, counted and modelled at a 152k
vocabulary). The compiled machine code of the kernels is in ``benchmarks/compile/gpu_compile.py``.

The default run is a complete picture in a few minutes on 2 cores (the README gives the times
measured): each recipe as published (KL only for GRPO) at two sizes on the CPU. ``--full`` adds the
other sizes and each recipe with and without the KL term; the output says what the default left out.

Usage::

    python benchmarks/bench_loss.py            # the README's command
    python benchmarks/bench_loss.py --full     # every size, each recipe with and without KL
    python benchmarks/bench_loss.py --quick    # one small size, few repetitions
    python benchmarks/bench_loss.py --help     # the contenders, the defaults, the formats
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    # No GPU: the fused kernels can only be counted, in Triton's interpreter, which must be chosen
    # before triton is first imported. Their timings are not taken (they would measure Python).
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_hidden  # noqa: E402
import bench_logits  # noqa: E402
import harness  # noqa: E402
import plots  # noqa: E402
import problems  # noqa: E402
import roofline  # noqa: E402
import summary  # noqa: E402
from harness import Column, Meter, Part, Run  # noqa: E402
from rlloss.recipes import DAPO, DR_GRPO, GRPO, Recipe  # noqa: E402
import spread  # noqa: E402
from spread import Ratio, Spread  # noqa: E402

RECIPES: dict[str, Recipe] = {"GRPO": GRPO, "DAPO": DAPO, "Dr. GRPO": DR_GRPO}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_SIZES = ((8, 512), (16, 1024), (32, 2048), (64, 4096))
CPU_DEFAULT_SIZES = ((16, 1024), (64, 4096))
GPU_SIZES = ((8, 512), (16, 1024), (32, 2048), (64, 4096), (64, 16384), (8, 32768))
QUICK_SIZES = ((8, 256),)
KL_BETA = 0.04
BASELINE = "trl-inline"
CONTENDERS = {
    BASELINE: "TRL's GRPO loss arithmetic written inline in eager PyTorch (the peer)",
    "rlloss-torch": 'rlloss.policy_loss(backend="torch"), the eager reference',
    "rlloss-compile": "the same reference under torch.compile (--no-compile leaves it out)",
    "rlloss-triton": "the fused Triton kernels (CUDA only)",
}
CPU_REPS, CUDA_REPS, QUICK_REPS = 15, 30, 5
MIN_SECONDS = 1.0  # per case, the contenders' steps together: small cases take more steps (harness.Meter)
SLOW_PART_REPS = 3  # the default CPU run's steps per contender in the from-logits and from-hidden parts
PHASES = harness.PHASES
LossFn = harness.LossFn


@dataclasses.dataclass(frozen=True)
class Case:
    recipe: str
    kl: bool
    dtype: str
    b: int
    t: int


@dataclasses.dataclass(frozen=True)
class Row(Case):
    contender: str
    ms: dict[str, float]  # medians per phase ("fwd+bwd": the step's total)
    spread: dict[str, dict[str, float]]  # per phase: median, quartiles, extremes, count (Spread.as_dict)
    peak_extra_bytes: int

    @property
    def tokens(self) -> int:
        return self.b * self.t

    def total(self) -> Spread:
        return Spread.from_dict(self.spread["fwd+bwd"])


def cases(sizes: tuple[tuple[int, int], ...], dtypes: list[str], full: bool = True) -> list[Case]:
    """Every recipe in every dtype and size; with and without the KL term when ``full``, else as
    published (KL for GRPO only)."""
    return [Case(r, kl, d, b, t) for d in dtypes for (b, t) in sizes for r in RECIPES for kl in (False, True)
            if full or kl == (RECIPES[r].beta != 0)]


def build(name: str, recipe_name: str, kl: bool, inputs: dict[str, torch.Tensor], *, compile: bool = True) -> LossFn:
    """The loss of contender ``name`` as a function of ``logp``; ``compile=False`` runs the compile
    contender's computation uncompiled (what the tests check: compiling takes minutes on 2 cores)."""
    recipe, beta = RECIPES[recipe_name], KL_BETA if kl else 0.0
    tensors = (inputs["old_logp"], inputs["adv"], inputs["mask"], inputs["ref_logp"])
    if name == BASELINE:
        return problems.trl_loss(*tensors, recipe, beta)
    if name in ("rlloss-torch", "rlloss-triton"):
        return problems.rlloss_loss(*tensors, recipe, "torch" if name == "rlloss-torch" else "triton", beta)
    if name == "rlloss-compile":
        kw = problems.loss_options(recipe, inputs["logp"].shape[1], beta)
        if kl:
            kw["ref_logp"] = inputs["ref_logp"]
        args = problems.reference_args(kw)
        step = harness.compiled(problems.policy_reference()) if compile else problems.policy_reference()
        return lambda logp: step(logp, inputs["old_logp"], inputs["adv"], inputs["mask"], *args).loss
    raise ValueError(f"unknown contender {name!r}")


def contenders(with_triton: bool, with_compile: bool) -> list[str]:
    return [BASELINE, "rlloss-torch"] + ["rlloss-compile"] * with_compile + ["rlloss-triton"] * with_triton


def sweep(names: list[str], todo: list[Case], device: torch.device, meter: Meter, progress: bool = True) -> list[Row]:
    bench = harness.Bench(
        inputs=lambda c: problems.loss_inputs(c.b, c.t, DTYPES[c.dtype], device),
        build=lambda name, c, inputs: build(name, c.recipe, c.kl, inputs),
        leaf="logp", describe=lambda c: f"{c.recipe} {c.dtype} {c.b}x{c.t}")
    return [Row(**dataclasses.asdict(c), contender=n, ms={p: s.median for p, s in spreads.items()},
                spread={p: s.as_dict() for p, s in spreads.items()}, peak_extra_bytes=peak)
            for c, n, spreads, peak in harness.sweep(bench, todo, names, meter, progress)]


def table(rows: list[Row], names: list[str]) -> str:
    """One line per case and contender: medians of forward, backward and total; the total's IQR as
    a share of its median (``?``: noisy); ``x trl-inline``, the peer's total over this one's, with
    the range of their quartiles."""
    base = {(r.recipe, r.kl, r.dtype, r.b, r.t): r.total() for r in rows if r.contender == BASELINE}
    columns = [Column("recipe", "<9"), Column("KL", "<4"), Column("dtype", "<6"), Column("B x T", ">9"),
               Column("contender", ">16"), Column("fwd ms", ">9.3f"), Column("bwd ms", ">9.3f"),
               Column("total ms", ">10.3f"), Column("IQR %", ">7"), Column(f"x {BASELINE} [range]", ">24"),
               Column("peak MiB", ">10.2f")]
    order = {n: i for i, n in enumerate(names)}
    body = [(r.recipe, "yes" if r.kl else "no", r.dtype, f"{r.b}x{r.t}", r.contender, r.ms["fwd"], r.ms["bwd"],
             r.ms["fwd+bwd"], f"{100 * r.total().rel_iqr:.0f}" + ("?" if r.total().noisy else ""),
             "(the peer)" if r.contender == BASELINE else str(Ratio.of(base[(r.recipe, r.kl, r.dtype, r.b, r.t)],
                                                                         r.total())), r.peak_extra_bytes / 2**20)
            for r in sorted(rows, key=lambda r: (r.dtype, r.recipe, r.kl, r.tokens, order[r.contender]))]
    return harness.fixed_table(columns, body)


def published_kl() -> dict[str, bool]:
    """Each recipe as published: with its KL term or without (GRPO has one, DAPO and Dr. GRPO none)."""
    return {name: recipe.beta != 0 for name, recipe in RECIPES.items()}


def run_loss(run: Run, dtypes: list[str]) -> tuple[dict[str, Any], list[Row], list[str]]:
    """The timed policy loss: the sweep and its table."""
    with_triton = run.on_gpu and harness.triton_version() is not None
    names = contenders(with_triton, with_compile=run.compile)
    if not with_triton:
        why = "triton does not import" if run.on_gpu else "no CUDA device, and interpreter timings would measure " \
            "Python, not a kernel"
        print(f"rlloss-triton: skipped: {why}")
        run.skipped.append(f"rlloss-triton ({why})")
    if not run.compile:
        run.skip("rlloss-compile (--no-compile)")
    sizes = QUICK_SIZES if run.quick else GPU_SIZES if run.on_gpu else CPU_SIZES if run.full else CPU_DEFAULT_SIZES
    if run.quick:
        run.skip(f"policy loss: every size but {QUICK_SIZES[0][0]}x{QUICK_SIZES[0][1]} (--quick)")
    if not run.full:
        left = [f"{b}x{t}" for b, t in (GPU_SIZES if run.on_gpu else CPU_SIZES) if (b, t) not in sizes]
        run.skip("policy loss: " + (f"sizes {', '.join(left)} and " if left and not run.quick else "")
                 + "each recipe with its KL term switched the other way (--full runs them)")
    rows = sweep(names, cases(sizes, dtypes, run.full), run.device, run.meter, run.progress)
    m = run.meter
    steps = f"{m.reps} steps" + (f" or more, to span {m.min_seconds:g} s per case," if m.min_seconds else "")
    print(f"\nmedians of {steps} after {m.warmup} warm-up, the contenders taking turns, each step timed as its "
          "forward and its backward (total = their sum, per step); IQR % = the total's interquartile range / its "
          f"median (? above {100 * spread.NOISY_IQR:.0f}%); x {BASELINE} = its total / the contender's, [range] from "
          f"their quartiles (? wider than {spread.NOISY_RATIO:g}x); peak MiB = extra memory of one step; "
          f"{m.clock.label}")
    print(table(rows, names))
    record = {"reps": m.reps, "warmup": m.warmup, "rows": [dataclasses.asdict(r) | {"tokens": r.tokens} for r in rows]}
    return record, rows, names


# The report's other parts, in order: each prints its section and returns its part of the JSON record.
PARTS: tuple[Part, ...] = (
    roofline.PART,
    bench_logits.PART,
    bench_hidden.PART,
)


def dtype_list(text: str) -> list[str]:
    """``--dtypes``: a comma-separated list of names from ``DTYPES``."""
    names = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--dtypes takes a comma-separated list of {', '.join(DTYPES)}; got {text!r}")
    return names


def sizes_text(sizes: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(f"{b}x{t}" for b, t in sizes)


def epilog() -> str:
    """``--help``'s closing text: the contenders of every part, the sizes each mode runs, the outputs."""
    part_contenders = [("from logits", bench_logits.CONTENDERS), ("from hidden states", bench_hidden.CONTENDERS)]
    lines = ["contenders (rlloss-*: rlloss; the others are its peers):", "  policy loss:"]
    lines += [f"    {name:16} {what}" for name, what in CONTENDERS.items()]
    lines += [f"  {part}: {', '.join(names)}" for part, names in part_contenders]
    lines += ["  a contender that cannot run here is listed with the reason and, for a missing package, how to",
              "  install it. TRL's contender from hidden states (trl-1.16, which runs on the CPU too):",
              *textwrap.wrap(harness.install_hint("trl"), 96, initial_indent="    ", subsequent_indent="    ",
                             break_on_hyphens=False),
              "",
              "policy loss sizes (B x T):",
              f"  CPU: {sizes_text(CPU_DEFAULT_SIZES)}; --full: {sizes_text(CPU_SIZES)}; "
              f"--quick: {sizes_text(QUICK_SIZES)}",
              f"  CUDA: {sizes_text(GPU_SIZES)}",
              f"  recipes: {', '.join(RECIPES)}, each as published (KL only for GRPO, beta {KL_BETA}); --full: "
              "with and without KL",
              "",
              "every timed figure: the median of --reps steps with its quartiles; total = forward + backward of the",
              f"same step. A speed-up whose quartile range is wider than {spread.NOISY_RATIO:g}x is marked ? and the "
              "run warns.",
              "",
              "output: tables on stdout, then a summary (per recipe, rlloss against the best peer, each speed-up",
              "with its range); --out-dir/bench-<cpu|cuda>[-quick].json and a .png of every part beside it",
              "(-quick unless --full: only --full writes the committed record)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help="every size, each recipe with and without KL, the counts at 1M tokens (slow)")
    parser.add_argument("--quick", action="store_true", help=f"one small size, {QUICK_REPS} repetitions: a smoke run")
    parser.add_argument("--reps", type=int, default=None, metavar="N",
                        help=f"timed steps per case and contender (default: {CPU_REPS} on the CPU, "
                             f"{CUDA_REPS} on CUDA, {QUICK_REPS} with --quick; the from-logits and from-hidden parts "
                             f"take at most 3 and 5, and at most {SLOW_PART_REPS} in a CPU run without --full)")
    parser.add_argument("--warmup", type=int, default=2, metavar="N",
                        help="untimed steps first, torch.compile's compilation among them (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch's intra-op threads while the policy loss is timed on the CPU (default: 1: its ops "
                             "are small, and on a shared machine a second thread waits for a busy core longer than an "
                             "op takes; 0: torch's default). The other parts, whose ops are large, and CUDA runs use "
                             "torch's default")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile contenders (their compilation takes minutes on 2 cores)")
    parser.add_argument("--dtypes", type=dtype_list, default=list(DTYPES), metavar="LIST",
                        help=f"comma-separated, of {', '.join(DTYPES)} (default: {','.join(DTYPES)})")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results", metavar="DIR",
                        help="where the JSON record and the PNG go (default: benchmarks/results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    for part in PARTS:
        parser.add_argument(f"--skip-{part.flag}", action="store_true", help=part.help)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads if args.threads is not None else 1 if device.type == "cpu" else 0
    return _run(args, device, threads or torch.get_num_threads())


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside, the caller's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(args: argparse.Namespace, device: torch.device, loss_threads: int) -> int:
    started = time.perf_counter()
    reps = args.reps or (QUICK_REPS if args.quick else CUDA_REPS if device.type == "cuda" else CPU_REPS)
    meter = dataclasses.replace(Meter.for_device(device, reps, args.warmup),
                                min_seconds=0.0 if args.quick else MIN_SECONDS)
    run = Run(device, meter, full=args.full and not args.quick,
              quick=args.quick, compile=not args.no_compile, model=not getattr(args, "skip_model", False),
              progress=not args.no_progress)
    env = harness.environment(device, run.meter.clock.label)
    env["policy_loss_threads"] = loss_threads
    print(f"rlloss benchmark: {env['kind']}; device {env['device']}; torch {env['torch']}; triton {env['triton']}; "
          f"{env['cpu_count']} cores; the policy loss timed on {loss_threads} thread(s), the other parts on "
          f"{env['threads']}; {env['date']}")

    with intra_op_threads(loss_threads):  # the compiled contender is compiled in here, at this count too
        record, rows, names = run_loss(run, args.dtypes)
    record = {"environment": env, "full": run.full, "published_kl": published_kl(), **record}
    seconds = {"policy loss": time.perf_counter() - started}
    # On the CPU a step of the from-logits and from-hidden problems takes seconds: the default run
    # times at most SLOW_PART_REPS of them (each part caps its own count too); --full leaves the parts' own.
    slow_parts = dataclasses.replace(run, meter=run.meter.with_reps(min(run.meter.reps, SLOW_PART_REPS),
                                                                     run.meter.warmup))
    for part in PARTS:
        if getattr(args, f"skip_{part.flag}"):
            run.skip(f"{part.name} (--skip-{part.flag})")
            continue
        part_started = time.perf_counter()
        record |= part.run(run if run.full or run.on_gpu else slow_parts)
        seconds[part.name] = time.perf_counter() - part_started

    tag = ("cuda" if run.on_gpu else "cpu") + ("" if run.full else "-quick")  # only a full run is the record
    json_path, png = args.out_dir / f"bench-{tag}.json", args.out_dir / f"bench-{tag}.png"
    found = summary.entries(record, record["published_kl"])
    record["summary"] = [e.to_json() for e in found]
    record["skipped"] = run.skipped
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["seconds_per_part"] = {k: round(v, 1) for k, v in seconds.items()}
    record["title"] = (f"rlloss benchmark, {env['kind']}, {env['device']}, policy loss on {loss_threads} thread(s), "
                       f"the other parts on {env['threads']}, {env['date'][:10]}")
    harness.write_json(json_path, record)
    drew = plots.draw(record, record["published_kl"], png, record["title"])
    print(f"\nwrote {json_path}" + (f" and {png}" if drew else " (no figure: matplotlib is missing)"))
    if run.skipped:
        print("this run left out: " + "; ".join(run.skipped))
    print(f"took {time.perf_counter() - started:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    print("\n" + summary.render(record, found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
